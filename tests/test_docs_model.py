"""Documents against a plain model: random puts, deletes and transactions with right, wrong and absent
expected versions; after every step each key, the prefix listing and the versions match the model."""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import stateline
from stateline import Conflict

KEYS = st.sampled_from(["a", "a/1", "a/2", "b", "b/x"])
VALUES = st.none() | st.integers(-3, 3) | st.text(max_size=3) | st.lists(st.integers(0, 2), max_size=2)
MODES = st.sampled_from(["blind", "right", "wrong", "absent"])


class DocsModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.db = stateline.open("memory://")
        self.docs = self.db.tenant("acme").docs
        self.model: dict[str, tuple[Any, int]] = {}

    def teardown(self) -> None:
        self.db.close()

    def _expected(self, key: str, mode: str) -> dict[str, Any]:
        version = self.model.get(key, (None, 0))[1]
        if mode == "right":
            return {"expected_version": version} if version else {"must_not_exist": True}
        if mode == "wrong":
            return {"expected_version": version + 1}
        if mode == "absent":
            return {"must_not_exist": True}
        return {}

    @rule(key=KEYS, value=VALUES, mode=MODES)
    def put(self, key: str, value: Any, mode: str) -> None:
        old = self.model.get(key)
        ok = mode in ("blind", "right") or (mode == "absent" and old is None)
        try:
            written = self.docs.put(key, value, **self._expected(key, mode))
        except Conflict:
            assert not ok
            return
        assert ok
        version = 1 if old is None else old[1] + 1
        assert written.version == version
        self.model[key] = (value, version)

    @rule(key=KEYS, mode=st.sampled_from(["blind", "right", "wrong"]))
    def delete(self, key: str, mode: str) -> None:
        old = self.model.get(key)
        version = old[1] if old else 0
        if mode == "right" and old is None:
            mode = "blind"  # versions start at 1: nothing to expect of an absent document
        options = {} if mode == "blind" else {"expected_version": version + (mode == "wrong")}
        try:
            deleted = self.docs.delete(key, **options)
        except Conflict:
            assert mode == "wrong"
            return
        assert mode != "wrong"
        assert deleted == (old is not None)
        self.model.pop(key, None)

    @rule(src=KEYS, dst=KEYS, gone=KEYS)
    def transfer(self, src: str, dst: str, gone: str) -> None:
        """A transaction: read src, write its value (or 0) into dst, delete gone."""
        with self.docs.transaction() as tx:
            doc = tx.get(src)
            tx.put(dst, doc.value if doc is not None else 0)
            if tx.get(gone) is not None:
                tx.delete(gone)
        value = self.model[src][0] if src in self.model else 0
        self.model[dst] = (value, self.model[dst][1] + 1 if dst in self.model else 1)
        if gone in self.model:
            self.model.pop(gone)

    @invariant()
    def matches_the_model(self) -> None:
        for key in ["a", "a/1", "a/2", "b", "b/x"]:
            doc = self.docs.get(key)
            assert (None if doc is None else (doc.value, doc.version)) == self.model.get(key), key
        listed = [(d.key, d.value, d.version) for d in self.docs.list("a")]
        assert listed == [(k, v, n) for k, (v, n) in sorted(self.model.items()) if k.startswith("a")]


TestDocsModel = DocsModel.TestCase
TestDocsModel.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
