"""Private key files through the installed `pinrpc` program, as an operator runs it.

tests/test_identity.py and tests/test_client_cli.py cover the library and main([...]); this is
the console script in a real process: exit code, one stderr line, the fix in it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import Connect, MakeClient
from tests.security.attacker import BIN


def pinrpc(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PINRPC_")}
    done = subprocess.run(
        [str(BIN / "pinrpc"), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout, done.stderr


def test_key_readable_by_others_is_refused_with_the_fix(
    connect: Connect, make_client: MakeClient
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    for mode in (0o604, 0o640):  # other-readable, group-readable
        alice.key_path.chmod(mode)
        code, out, err = pinrpc("whoami", *connect.cli_flags(alice))
        assert code == 1 and out == ""
        assert err.count("\n") == 1, err
        assert f"(mode {mode:04o}); run: chmod 600 {alice.key_path}" in err
    code, out, _ = pinrpc("whoami", "--insecure-key-permissions", *connect.cli_flags(alice))
    assert code == 0 and "alice" in out
    alice.key_path.chmod(0o600)  # the fix the message gives
    assert pinrpc("whoami", *connect.cli_flags(alice))[0] == 0


def test_encrypted_key_with_passphrase_from_the_environment(
    connect: Connect, make_client: MakeClient, tmp_path: Path
) -> None:
    alice = make_client("alice", passphrase=b"correct horse")
    connect.enroll(alice, "alice")
    assert b"ENCRYPTED PRIVATE KEY" in alice.key_path.read_bytes()
    flags = connect.cli_flags(alice)

    code, _, err = pinrpc("whoami", *flags)
    assert code == 1 and err.count("\n") == 1 and "PINRPC_KEY_PASSPHRASE" in err
    code, _, err = pinrpc("whoami", *flags, env={"PINRPC_KEY_PASSPHRASE": "wrong"})
    assert code == 1 and err.count("\n") == 1 and "wrong passphrase" in err
    code, out, _ = pinrpc("whoami", *flags, env={"PINRPC_KEY_PASSPHRASE": "correct horse"})
    assert code == 0 and "alice" in out
