"""The WebSocket control protocol parser and encoders (pure)."""

from __future__ import annotations

import json

import pytest

from bridge import wsproto
from bridge.errors import ProtocolError


def test_resize_parses():
    assert wsproto.parse_client_text('{"type":"resize","cols":80,"rows":24}') == wsproto.Resize(80, 24)
    assert wsproto.parse_client_text('{"type":"resize","cols":1000,"rows":1}') == wsproto.Resize(1000, 1)


def test_end_parses():
    """The page's "End session" button: no fields; extra fields are ignored like resize's."""
    assert wsproto.parse_client_text('{"type":"end"}') == wsproto.End()
    assert wsproto.parse_client_text('{"type":"end","why":"done"}') == wsproto.End()
    with pytest.raises(ProtocolError):
        wsproto.parse_client_text('{"type":"End"}')


@pytest.mark.parametrize(
    "text",
    [
        "", "{", "null", "[]", '"resize"', "{}", '{"type":5}', '{"type":"nope"}',
        '{"type":"resize","cols":0,"rows":24}', '{"type":"resize","cols":80,"rows":1001}',
        '{"type":"resize","cols":80.5,"rows":24}', '{"type":"resize","cols":true,"rows":24}',
        '{"type":"resize","cols":"80","rows":24}', '{"type":"resize","cols":80}',
        "[" * 100000, '{"type":"resize","cols":80,"rows":24,"pad":"' + "x" * 5000 + '"}',
    ],
)
def test_bad_messages_raise_protocol_error(text):
    with pytest.raises(ProtocolError) as info:
        wsproto.parse_client_text(text)
    assert info.value.user_message and len(info.value.user_message) < 200


def test_server_messages():
    assert json.loads(wsproto.session_message("abc", 900.0, 5)) == {"type": "session", "id": "abc", "idle_timeout": 900, "offset": 5}
    assert json.loads(wsproto.idle_warning(59.6)) == {"type": "idle-warning", "seconds": 60}
    assert json.loads(wsproto.exit_message(0, "exit")) == {"type": "exit", "code": 0, "reason": "exit"}
    assert json.loads(wsproto.exit_message(None, "killed", "bye")) == {"type": "exit", "code": None, "reason": "killed", "message": "bye"}
    assert json.loads(wsproto.error_message("no")) == {"type": "error", "message": "no"}
    assert json.loads(wsproto.restarting_message()) == {"type": "restarting"}
    with pytest.raises(ValueError):
        wsproto.exit_message(0, "disconnected")
