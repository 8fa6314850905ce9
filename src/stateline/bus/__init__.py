"""The change feed beyond the store: a relay to NATS JetStream, a consumer helper, in-process subscriptions."""

from stateline.bus.consumer import consume, consume_async
from stateline.bus.envelope import ALIASES, envelope_of, subject_of
from stateline.bus.relay import Relay
from stateline.bus.subscribe import Subscription

__all__ = ["ALIASES", "Relay", "Subscription", "consume", "consume_async", "envelope_of", "subject_of"]
