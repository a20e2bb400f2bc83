"""The model call the pipeline hands to the upstream port."""

from __future__ import annotations

from neuronetz_gateway.domain.model_call import session_hint


def test_session_hint_reads_the_agents_session_headers() -> None:
    assert session_hint([(b"accept", b"*/*")]) is None
    assert session_hint([(b"x-claude-code-session-id", b"abc-1")]) == "abc-1"
    assert session_hint([(b"session-id", b"codex-7"), (b"x-claude-code-session-id", b"x")]) == (
        "codex-7"
    )
    assert session_hint([(b"session-id", b""), (b"x-claude-code-session-id", b"later")]) == "later"
    assert session_hint([(b"session-id", b"s" * 500)]) == "s" * 200
