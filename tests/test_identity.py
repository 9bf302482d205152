"""Key pairs, certificates and fingerprints as `pinrpc keygen` / `fingerprint` make them."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from client import cli
from pinrpc.errors import IdentityError, KeyPermissionError
from pinrpc.identity import (
    Fingerprint,
    check_name,
    create_identity,
    load_certificate,
    load_private_key,
    same_public_key,
    write_all,
    write_atomic,
)
from tests.certs import make_cert, p256


def test_keygen_writes_a_private_key_and_a_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["keygen", "alice", "--dir", str(tmp_path / "keys")]) == 0
    out = capsys.readouterr().out
    key, crt = tmp_path / "keys" / "alice.key", tmp_path / "keys" / "alice.crt"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    fp = Fingerprint.of(load_certificate(crt))
    assert f"fingerprint  {fp}" in out
    assert same_public_key(load_private_key(key), load_certificate(crt))
    assert {p.name for p in key.parent.iterdir()} == {"alice.key", "alice.crt"}  # no temp files


def test_fingerprint_matches_openssl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = create_identity("alice", tmp_path)
    assert cli.main(["fingerprint", str(files.cert_path)]) == 0
    ours = capsys.readouterr().out.strip()
    openssl = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(files.cert_path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert openssl.split("=", 1)[1] == ours
    assert Fingerprint.parse(openssl) == files.fingerprint  # the whole line, pasted


def test_certificate_cannot_mint_other_certificates(tmp_path: Path) -> None:
    cert = load_certificate(create_identity("alice", tmp_path).cert_path)
    ext = cert.extensions
    constraints = ext.get_extension_for_class(x509.BasicConstraints)
    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert constraints.critical and not constraints.value.ca
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    validity = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 365 <= validity.days <= 366


def test_subjects_are_unique_for_the_same_name(tmp_path: Path) -> None:
    one = load_certificate(create_identity("alice", tmp_path / "1").cert_path)
    two = load_certificate(create_identity("alice", tmp_path / "2").cert_path)
    assert one.subject != two.subject


def test_existing_files_are_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = create_identity("alice", tmp_path)
    before = first.key_path.read_bytes()
    assert cli.main(["keygen", "alice", "--dir", str(tmp_path)]) == 1
    assert "--force" in capsys.readouterr().err
    assert first.key_path.read_bytes() == before
    assert cli.main(["keygen", "alice", "--dir", str(tmp_path), "--force"]) == 0
    assert first.key_path.read_bytes() != before


def test_key_types(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rsa = create_identity("r", tmp_path, key_type="rsa2048")
    assert load_certificate(rsa.cert_path).public_key().key_size == 2048  # type: ignore[union-attr]
    assert cli.main(["keygen", "ed", "--dir", str(tmp_path), "--key-type", "ed25519"]) == 1
    err = capsys.readouterr().err
    assert "Ed25519 keys fail the TLS handshake" in err
    assert not (tmp_path / "ed.key").exists()


def test_days_and_bad_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = create_identity("short", tmp_path, days=7)
    cert = load_certificate(files.cert_path)
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 7
    assert cli.main(["keygen", "../escape", "--dir", str(tmp_path)]) == 1
    assert "invalid client name" in capsys.readouterr().err
    for days in ("0", "36501", "99999999999"):  # usage errors, not an overflow in datetime
        with pytest.raises(SystemExit) as info:
            cli.main(["keygen", "zero", "--dir", str(tmp_path), "--days", days])
        assert info.value.code == 2
    assert not (tmp_path / "zero.key").exists()


def test_keygen_makes_a_new_directory_the_owners_alone_under_any_umask(tmp_path: Path) -> None:
    pinrpc = Path(sys.executable).parent / "pinrpc"
    new, existing = tmp_path / "new" / "keys", tmp_path / "shared"
    existing.mkdir(mode=0o755)
    for directory in (new, existing):
        # umask=, not a preexec_fn: Python code between fork and exec runs grpc's fork handlers,
        # which aborted the child (SIGABRT) when the suite had grpc threads running.
        subprocess.run(
            [str(pinrpc), "keygen", "alice", "--dir", str(directory)],
            check=True, capture_output=True, timeout=30, umask=0,
        )  # fmt: skip
        assert stat.S_IMODE((directory / "alice.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(new.stat().st_mode) == 0o700  # not 0777: others could swap the pair
    assert stat.S_IMODE(existing.stat().st_mode) == 0o755  # the user's own choice stays


def test_a_long_bad_name_is_quoted_in_part() -> None:
    # Strangers send names too (the enrollment port): the error must not echo 100,000 bytes.
    with pytest.raises(IdentityError) as long:
        check_name("x" * 99_999 + "/")
    assert "'" + "x" * 64 + "'... (100000 characters)" in str(long.value)
    assert len(str(long.value)) < 200
    with pytest.raises(IdentityError) as short:
        check_name("a/b")
    assert "invalid client name 'a/b': use" in str(short.value)


@pytest.mark.parametrize(
    "text",
    [
        "AB:" * 31 + "AB",
        "ab" * 32,
        "sha256:" + "Ab" * 32,
        "SHA256:" + "ab:" * 31 + "ab",
        "  " + "ab" * 32 + "\n",
        # Pasted: wrapped, tab- or no-break-space-separated, or openssl's whole line.
        "AB:" * 16 + "\n  " + "AB:" * 15 + "AB",
        "\t".join(["ab"] * 32),
        "\u00a0".join(["AB"] * 32),
        "sha256 Fingerprint=" + "AB:" * 31 + "AB",
        "SHA256 Fingerprint=" + "AB:" * 31 + "AB\n",
    ],
)
def test_fingerprint_parsing_is_tolerant(text: str) -> None:
    fp = Fingerprint.parse(text)
    assert str(fp) == "AB:" * 31 + "AB"
    assert fp.hex == "ab" * 32


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ab" * 31,
        "zz" * 32,
        "ab" * 33,
        "md5:" + "ab" * 32,
        "sha1 Fingerprint=" + "AB:" * 31 + "AB",
        "sha256 Fingerprint=" + "AB:" * 30 + "AB",
        "Fingerprint=" + "ab" * 32,
        "sha256:sha256:" + "ab" * 32,
    ],
)
def test_fingerprint_parsing_rejects_non_fingerprints(text: str) -> None:
    with pytest.raises(ValueError, match="not a SHA-256 fingerprint"):
        Fingerprint.parse(text)


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    files = create_identity("alice", tmp_path)
    files.key_path.chmod(0o644)
    with pytest.raises(KeyPermissionError, match="chmod 600") as refused:
        load_private_key(files.key_path)
    # Library code has no flag to pass: the message names the keyword too.
    assert "insecure_key_permissions=True" in str(refused.value)
    assert load_private_key(files.key_path, check_permissions=False)


def test_encrypted_key_needs_its_passphrase(tmp_path: Path) -> None:
    files = create_identity("alice", tmp_path, passphrase=b"s3cret")
    assert b"ENCRYPTED" in files.key_path.read_bytes()
    with pytest.raises(IdentityError, match="PINRPC_KEY_PASSPHRASE, or passphrase= in code"):
        load_private_key(files.key_path)
    with pytest.raises(IdentityError) as wrong:
        load_private_key(files.key_path, passphrase=b"nope")
    assert "wrong passphrase (PINRPC_KEY_PASSPHRASE, or passphrase= in code)" in str(wrong.value)
    assert "not a PEM private key" not in str(wrong.value)  # the file is fine
    key = load_private_key(files.key_path, passphrase=b"s3cret")
    assert same_public_key(key, load_certificate(files.cert_path))
    # The other way round: each message names the one thing to fix.
    plain = create_identity("bob", tmp_path)
    with pytest.raises(IdentityError, match=r"not encrypted, .*unset it to use this key"):
        load_private_key(plain.key_path, passphrase=b"s3cret")
    broken = tmp_path / "broken.key"
    broken.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    broken.chmod(0o600)
    with pytest.raises(IdentityError) as garbage:
        load_private_key(broken, passphrase=b"s3cret")
    assert "not a PEM private key" in str(garbage.value)
    assert "passphrase" not in str(garbage.value)


def race_keygen(directory: Path) -> list[str]:
    """Two create_identity() for one name, released together; "ok" or the error of each."""
    start = threading.Barrier(2)
    results: list[str] = []

    def keygen() -> None:
        start.wait(5)
        try:
            create_identity("r", directory)
            results.append("ok")
        except IdentityError as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=keygen) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_concurrent_keygen_leaves_one_matching_pair(tmp_path: Path) -> None:
    """Two runs racing for one name: one wins, the other fails, the files match."""
    for round_ in range(20):
        directory = tmp_path / str(round_)
        results = race_keygen(directory)
        assert sorted(results, key=len)[0] == "ok" and len(results) == 2, results
        assert "already exists" in sorted(results, key=len)[1]
        key = load_private_key(directory / "r.key")
        assert same_public_key(key, load_certificate(directory / "r.crt"))
        assert sorted(p.name for p in directory.iterdir()) == ["r.crt", "r.key"]


def test_dir_that_is_a_file_is_named_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_dir = tmp_path / "keys"
    not_a_dir.write_bytes(b"a file")
    for force in ([], ["--force"]):  # --force cannot help, so it must not be the advice
        assert cli.main(["keygen", "alice", "--dir", str(not_a_dir), *force]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{not_a_dir} is not a directory" in err, err
        assert "--force" not in err
    assert not_a_dir.read_bytes() == b"a file"
    assert cli.main(["keygen", "alice", "--dir", str(tmp_path / "new" / "keys")]) == 0


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    """Each directory fsync()ed, with the names in it then (the real fsync runs too)."""
    synced: list[tuple[str, list[str]]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            placed = sorted(n for n in os.listdir(fd) if not n.startswith("."))  # no temps
            synced.append((os.readlink(f"/proc/self/fd/{fd}"), placed))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return synced


def test_keygen_syncs_the_directory_after_placing_the_pair(
    tmp_path: Path, synced: list[tuple[str, list[str]]]
) -> None:
    """A rename reaches the disk with its directory: fsync it once both names are there."""
    create_identity("alice", tmp_path / "keys")
    assert (str(tmp_path / "keys"), ["alice.crt", "alice.key"]) in synced
    synced.clear()
    create_identity("alice", tmp_path / "keys", force=True)  # replacing, too
    assert (str(tmp_path / "keys"), ["alice.crt", "alice.key"]) in synced


def test_a_file_written_atomically_is_synced_with_its_directory(
    tmp_path: Path, synced: list[tuple[str, list[str]]]
) -> None:
    """The server's warm-start file, obtain-cert's account key and the dev CA's files."""
    write_atomic(tmp_path / "warm", b"x", 0o600)
    assert synced == [(str(tmp_path), ["warm"])]


def test_write_all_gives_the_named_files_their_group_from_the_start(tmp_path: Path) -> None:
    """obtain-cert's renewed privkey.pem keeps the group a non-root server reads it with."""
    key, cert = tmp_path / "privkey.pem", tmp_path / "fullchain.pem"
    write_all([(key, b"k", 0o640), (cert, b"c", 0o644)], overwrite=True, owners={key: (-1, 4242)})
    assert (key.stat().st_gid, stat.S_IMODE(key.stat().st_mode)) == (4242, 0o640)
    assert (cert.stat().st_gid, stat.S_IMODE(cert.stat().st_mode)) == (os.getgid(), 0o644)


NOBODY = 65534


def test_write_all_that_may_not_give_a_group_names_it_and_changes_nothing() -> None:
    """As nobody, the second of three files asks for root's group: the chown fails after the
    first temporary file is written. The bare EPERM named neither the file nor the group."""
    script = (
        "import sys; from pathlib import Path; from pinrpc.identity import write_all\n"
        "d = Path(sys.argv[1]); files = [d / n for n in ('privkey.pem', 'chain.pem', 'x.pem')]\n"
        "try:\n"
        "    root = {files[1]: (-1, 0)}\n"
        "    write_all([(f, b'new', 0o640) for f in files], overwrite=True, owners=root)\n"
        "except OSError as exc:\n"
        "    sys.exit(f'{exc.filename}: {exc.strerror}')\n"
    )
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="pinrpc-nobody-") as tmp:
        out = Path(tmp)
        for name in ("privkey.pem", "chain.pem", "x.pem"):
            (out / name).write_bytes(b"old " + name.encode())
            os.chown(out / name, NOBODY, NOBODY)
        os.chown(out, NOBODY, NOBODY)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                sys.executable, "-c", script, str(out)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)
        assert done.returncode == 1
        assert done.stderr == f"{out / 'chain.pem'}: cannot give it group 0 (Operation not " \
            "permitted; only root or a member may)\n"  # fmt: skip
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary left


def test_write_all_refuses_a_directory_target_before_writing_anything(tmp_path: Path) -> None:
    key, cert = tmp_path / "privkey.pem", tmp_path / "fullchain.pem"
    key.write_bytes(b"old")
    cert.mkdir()
    with pytest.raises(IsADirectoryError) as caught:
        write_all([(key, b"new", 0o600), (cert, b"c", 0o644)], overwrite=True)
    assert caught.value.filename == str(cert)
    assert key.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fullchain.pem", "privkey.pem"]


def test_failed_keygen_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = create_identity("f1", tmp_path)
    before = first.key_path.read_bytes()
    first.cert_path.unlink()
    first.cert_path.mkdir()  # the certificate cannot be placed
    assert cli.main(["keygen", "f1", "--dir", str(tmp_path), "--force"]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert first.key_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f1.crt", "f1.key"]


def test_keygen_encrypts_with_the_passphrase_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PINRPC_KEY_PASSPHRASE", "caf\udce9")  # any bytes, UTF-8 or not
    assert cli.main(["keygen", "enc", "--dir", str(tmp_path)]) == 0
    assert "(mode 0600, encrypted with PINRPC_KEY_PASSPHRASE;" in capsys.readouterr().out
    key_path = tmp_path / "enc.key"
    assert b"ENCRYPTED" in key_path.read_bytes()
    with pytest.raises(IdentityError, match="PINRPC_KEY_PASSPHRASE"):
        load_private_key(key_path)
    key = load_private_key(key_path, passphrase=b"caf\xe9")
    assert same_public_key(key, load_certificate(tmp_path / "enc.crt"))
    monkeypatch.delenv("PINRPC_KEY_PASSPHRASE")
    assert cli.main(["keygen", "plain", "--dir", str(tmp_path)]) == 0
    assert b"ENCRYPTED" not in (tmp_path / "plain.key").read_bytes()
    assert "(mode 0600, not encrypted;" in capsys.readouterr().out
    # Set but empty (PINRPC_KEY_PASSPHRASE="$UNSET_VAR") counts as unset, and keygen says so.
    monkeypatch.setenv("PINRPC_KEY_PASSPHRASE", "")
    assert cli.main(["keygen", "empty", "--dir", str(tmp_path)]) == 0
    assert "(mode 0600, not encrypted;" in capsys.readouterr().out
    assert b"ENCRYPTED" not in (tmp_path / "empty.key").read_bytes()


def bad_point_certificate(path: Path) -> Path:
    """A certificate whose EC public key is not on the curve (the last byte flipped)."""
    key = p256()
    der = make_cert(key, "bad").public_bytes(serialization.Encoding.DER)
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    end = der.index(point) + len(point) - 1
    flipped = der[:end] + bytes([der[end] ^ 1]) + der[end + 1 :]
    path.write_bytes(
        x509.load_der_x509_certificate(flipped).public_bytes(serialization.Encoding.PEM)
    )
    return path


def test_certificate_with_an_unreadable_public_key_is_refused(tmp_path: Path) -> None:
    bad = bad_point_certificate(tmp_path / "bad.crt")
    with pytest.raises(IdentityError, match="holds a certificate that cannot be read"):
        load_certificate(bad)
    good = create_identity("good", tmp_path).cert_path
    assert load_certificate(good).public_key()
