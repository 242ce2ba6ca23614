"""Names no other writer will choose: a killed writer's leftovers then never collide with, or are taken for, a
later attempt's files, and can be found by their stem and removed."""

from __future__ import annotations

import os
import socket
import uuid


def attempt_name(stem: str, suffix: str = "") -> str:
    """`{stem}-{host}-{pid}-{8 hex}{suffix}`: unique across processes here and on other nodes."""
    return f"{stem}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"
