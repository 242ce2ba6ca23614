"""The storage layer: LocalStore and FsspecStore through the same tests (local: tmp_path; s3: a moto server on
loopback, see conftest's s3_server), then what only one of them has (flock vs. lease objects, bucket errors)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pyarrow as pa
import pytest

from taid_cache.errors import UserError
from taid_cache.storage import FsspecStore, LocalStore, attempt_name, is_remote, join, open_store, remote_errors

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(request.getfixturevalue("s3_bucket") + "/store")


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# -- both stores -----------------------------------------------------------------------------------------------


def test_write_read_size_and_missing(store):
    store.write_bytes("a.bin", b"\x00\x01payload")
    store.write_text("sub/note.txt", "héllo\n")
    assert store.read_bytes("a.bin") == b"\x00\x01payload"
    assert store.read_text("sub/note.txt") == "héllo\n"
    assert store.size("a.bin") == 9
    assert store.size("sub/note.txt") == len("héllo\n".encode())
    assert store.is_file("a.bin") and not store.is_file("sub") and not store.is_file("absent")
    store.write_bytes("a.bin", b"new")
    assert store.read_bytes("a.bin") == b"new"
    with pytest.raises(FileNotFoundError):
        store.read_bytes("absent")
    with pytest.raises(FileNotFoundError):
        store.open_input("absent")


def test_overwrite_is_seen_whole(store):
    old, new = b"o" * (256 << 10), b"n" * (300 << 10)
    store.write_bytes("f", old)
    stop, seen = threading.Event(), set()

    def read() -> None:
        while not stop.is_set():
            seen.add(store.read_bytes("f"))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(12):
            store.write_bytes("f", new if i % 2 == 0 else old)
    finally:
        stop.set()
        reader.join()
    assert seen and seen <= {old, new}


def test_list_exists_and_remove(store):
    for name in ("a", "ab", "a-b.arrow", "b.arrow", ".hidden", "sub/c.arrow", "sub/deeper/d"):
        store.write_bytes(name, name.encode())
    assert store.list() == [".hidden", "a", "a-b.arrow", "ab", "b.arrow", "sub"]
    assert store.list("*.arrow") == ["a-b.arrow", "b.arrow"]
    assert store.list("a*") == ["a", "a-b.arrow", "ab"]
    assert store.child("sub").list() == ["c.arrow", "deeper"]
    assert store.child("nothing").list() == []
    assert store.exists("") and store.exists("sub") and store.exists("sub/deeper") and store.exists("a")
    assert not store.exists("nothing") and not store.child("nothing").exists()

    store.remove("a")  # a file: its neighbours sharing the prefix stay
    assert store.list("a*") == ["a-b.arrow", "ab"]
    store.remove("sub")
    assert not store.exists("sub") and store.child("sub").list() == []
    store.remove("absent")
    store.remove("sub")
    assert store.list() == [".hidden", "a-b.arrow", "ab", "b.arrow"]
    store.remove()
    assert not store.exists() and store.list() == []


def test_child_and_where(store):
    sub = store.child("runs/one")
    sub.write_text("config.json", "{}")
    assert store.read_text("runs/one/config.json") == "{}"
    assert sub.where("config.json") == store.where("runs/one/config.json")
    assert sub.url == store.where("runs/one")
    if store.is_local:
        assert sub.local_path("config.json") == store.local_path() / "runs" / "one" / "config.json"
        assert store.where("x") == str(store.local_path() / "x")
    else:
        assert sub.local_path("config.json") is None
        assert store.where("runs/one/x") == store.url + "/runs/one/x"


def arrow_table() -> pa.Table:
    return pa.table({"ids": pa.array(range(1000), pa.int32()), "text": [f"row {i}" for i in range(1000)]})


def test_open_output_commits_an_arrow_file(store):
    table = arrow_table()
    with store.open_output("shard-0.arrow") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=100):
                writer.write_batch(batch)
        written = sink.tell()
    assert store.list() == ["shard-0.arrow"]
    assert store.size("shard-0.arrow") == written
    assert pa.ipc.open_file(store.open_input("shard-0.arrow")).read_all().equals(table)


def test_open_output_failure_leaves_nothing(store):
    with pytest.raises(RuntimeError, match="writer died"):
        with store.open_output("shard-0.arrow") as sink:
            sink.write(b"x" * 4096)
            raise RuntimeError("writer died")
    assert store.list() == [] and not store.exists("shard-0.arrow")


def test_create_exclusive(store):
    assert store.create_exclusive("lock.json", b"first")
    assert not store.create_exclusive("lock.json", b"second")
    assert store.read_bytes("lock.json") == b"first"


def test_lease_refuses_a_second_holder(store):
    expected = f"another process is already writing the cache (lock {store.where('writer.lock')}); wait for it or stop it"
    with store.lease("writer.lock", "the cache"):
        assert store.is_leased("writer.lock")
        with pytest.raises(UserError) as excinfo:
            with store.lease("writer.lock", "the cache"):
                pass
        assert one_line_error(excinfo) == expected
    assert not store.is_leased("writer.lock")
    with store.lease("writer.lock", "the cache"):  # released: taken again
        assert store.is_leased("writer.lock")


def test_lease_wait_takes_its_turn(store):
    # The default ttl (remote: a minute, polled every second): a lease whose refreshes stall for a whole ttl has
    # lapsed and may be taken, and a 2 s ttl lapsed on a loaded machine (the holder's first PUT and refreshes slow).
    acquired = threading.Event()

    def second() -> None:
        with store.lease("writer.lock", "the cache", wait=True):
            acquired.set()

    with store.lease("writer.lock", "the cache"):
        waiter = threading.Thread(target=second)
        waiter.start()
        assert not acquired.wait(0.5)  # still held: it waits (this can only miss a bug, never invent one)
    waiter.join(timeout=60)
    assert acquired.is_set()


def test_lease_of_a_killed_holder_does_not_block(store):
    """A holder killed with -9 (no clean-up at all) leaves a rerun on this machine free to take the lease."""
    code = ("import sys; from taid_cache.storage import open_store\n"
            "with open_store(sys.argv[1]).lease('writer.lock', 'the cache'):\n"
            "    print('held', flush=True); sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, store.url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert store.is_leased("writer.lock")
        with pytest.raises(UserError):
            with store.lease("writer.lock", "the cache"):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert store.exists("writer.lock")  # nobody removed it
    with store.lease("writer.lock", "the cache"):
        assert store.is_leased("writer.lock")


def test_upload_copies_last_after_the_rest_and_download_round_trips(store, tmp_path, monkeypatch):
    source = tmp_path / "model"
    files = {"config.json": b"{}", "a.safetensors": os.urandom(10_000), "sub/b.bin": b"b", "z.txt": b"z"}
    for name, data in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    committed = record_commits(store, monkeypatch)
    store.upload(source, "export", last="config.json")
    assert sorted(committed) == sorted(f"export/{n}" for n in files)
    assert committed[-1] == "export/config.json"
    assert store.child("export").list() == ["a.safetensors", "config.json", "sub", "z.txt"]

    back = tmp_path / "back"
    store.download("export", back)
    assert {p.relative_to(back).as_posix(): p.read_bytes() for p in back.rglob("*") if p.is_file()} == files
    store.upload(source / "z.txt", "single.txt")
    store.download("single.txt", tmp_path / "one" / "single.txt")
    assert (tmp_path / "one" / "single.txt").read_bytes() == b"z"
    with pytest.raises(FileNotFoundError):
        store.upload(source, "again", last="missing.json")
    with pytest.raises(FileNotFoundError):
        store.download("absent", tmp_path / "absent")


def record_commits(store, monkeypatch) -> list[str]:
    """The names of the files the store makes visible, in the order it does (local: the os.replace of each
    temporary; s3: each object's upload), relative to the store."""
    committed: list[str] = []
    if store.is_local:
        replace = os.replace

        def recording_replace(src, dst):
            replace(src, dst)
            committed.append(Path(dst).relative_to(store.local_path()).as_posix())

        monkeypatch.setattr(os, "replace", recording_replace)
    else:
        put_file = store.fs.put_file

        def recording_put(lpath, rpath, **kwargs):
            put_file(lpath, rpath, **kwargs)
            committed.append(rpath[len(store.root) + 1:])

        monkeypatch.setattr(store.fs, "put_file", recording_put)
    return committed


# -- open_store and names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["out", "./a/b/", "/abs/cache", "C:\\caches\\x", "a:b", "weird name/ü", ""])
def test_open_store_plain_paths_are_paths(path):
    store = open_store(path)
    assert isinstance(store, LocalStore) and store.is_local
    assert store.local_path() == Path(path)
    assert store.url == path
    assert not is_remote(path)


def test_open_store_schemes(s3_server):
    local = open_store("file:///x/y")
    assert isinstance(local, LocalStore) and local.local_path() == Path("/x/y")
    assert isinstance(open_store("file://localhost/x%20y"), LocalStore) and open_store("file://localhost/x%20y").local_path() == Path("/x y")
    remote = open_store("s3://bucket/x")
    assert isinstance(remote, FsspecStore) and not remote.is_local and remote.local_path() is None
    assert isinstance(open_store("S3://bucket/x"), FsspecStore)
    assert is_remote("s3://bucket/x") and is_remote("S3://bucket") and not is_remote("file:///x")
    assert join("s3://bucket/", "a", "b/c") == "s3://bucket/a/b/c"
    assert join("out", "a", "b") == str(Path("out") / "a" / "b")

    with pytest.raises(UserError) as excinfo:
        open_store("nosuch://x/y")
    message = one_line_error(excinfo)
    assert "unknown storage scheme 'nosuch://' in nosuch://x/y" in message and "s3://" in message


def test_open_store_missing_package_names_it():
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(UserError) as excinfo:
        open_store("gs://bucket/cache")
    message = one_line_error(excinfo)
    assert "gs://" in message and "gcsfs" in message


def test_attempt_names_are_unique_and_listed_by_stem(store):
    names = {attempt_name("part-0", ".arrow") for _ in range(50)}
    assert len(names) == 50
    assert all(n.startswith(f"part-0-{socket.gethostname()}-{os.getpid()}-") and n.endswith(".arrow") for n in names)
    for name in list(names)[:3]:
        store.write_bytes(name, b"")
    store.write_bytes("part-1.arrow", b"")
    assert store.list("part-0-*.arrow") == sorted(list(names)[:3])


# -- local only ------------------------------------------------------------------------------------------------


def test_local_check_writable_as_today(tmp_path):
    fresh = tmp_path / "new" / "run"
    open_store(str(fresh)).check_writable("--output")
    assert fresh.is_dir() and list(fresh.iterdir()) == []

    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError) as excinfo:
        open_store(str(tmp_path / "file")).check_writable("--output")
    assert one_line_error(excinfo) == f"--output {tmp_path / 'file'} is a file, not a folder"

    bad = str(tmp_path) + "/out-\udcff"
    with pytest.raises(UserError, match="is not a UTF-8 path"):
        open_store(bad).check_writable("--output")

    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UserError, match="cannot write there"):
            open_store(str(locked / "run")).check_writable("--output")


def test_local_open_output_writes_a_hidden_temporary_sibling(tmp_path):
    store = open_store(str(tmp_path))
    with store.open_output("shard.arrow") as sink:
        sink.write(b"abc")
        assert store.list() != [] and all(n.startswith(".shard.arrow.tmp-") for n in store.list())
    assert store.list() == ["shard.arrow"]


# -- s3 only ---------------------------------------------------------------------------------------------------


def test_s3_multipart_failure_is_aborted(s3_bucket):
    store = FsspecStore(s3_bucket + "/big", default_block_size=5 << 20)
    with pytest.raises(RuntimeError):
        with store.open_output("shard.arrow") as sink:
            sink.write(os.urandom(12 << 20))  # two parts uploaded before the failure
            raise RuntimeError("writer died")
    bucket = s3_bucket.removeprefix("s3://")
    client = boto3.client("s3")
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_s3_create_exclusive_is_conditional_on_the_server(s3_bucket):
    """The second create is refused by the server itself (If-None-Match: *), not by a check before the PUT."""
    bucket = s3_bucket.removeprefix("s3://")
    boto3.client("s3").put_object(Bucket=bucket, Key="k", Body=b"first")
    with pytest.raises(Exception, match="PreconditionFailed|pre-conditions"):
        boto3.client("s3").put_object(Bucket=bucket, Key="k", Body=b"second", IfNoneMatch="*")
    assert not open_store(s3_bucket).create_exclusive("k", b"third")
    assert boto3.client("s3").get_object(Bucket=bucket, Key="k")["Body"].read() == b"first"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("lease, taken", [
    ({"host": socket.gethostname(), "pid": None, "expires": 1e12}, True),  # its holder, on this host, is gone
    ({"host": "another-node", "pid": 1, "expires": 1.0}, True),  # expired
    ({"host": "another-node", "pid": 1, "expires": 1e12}, False),  # live elsewhere: never ours to judge
    ({"host": socket.gethostname(), "pid": os.getpid(), "expires": 1e12}, False),  # this very process holds it
])
def test_s3_stale_lease_is_taken_over(s3_bucket, lease, taken):
    store = open_store(s3_bucket)
    lease = {**lease, "pid": lease["pid"] or dead_pid(), "token": "theirs"}
    store.write_text("writer.lock", json.dumps(lease))
    assert store.is_leased("writer.lock") is not taken
    if not taken:
        with pytest.raises(UserError, match="another process is already writing"):
            with store.lease("writer.lock", "the cache"):
                pass
        assert json.loads(store.read_text("writer.lock"))["token"] == "theirs"
        return
    with store.lease("writer.lock", "the cache"):
        mine = json.loads(store.read_text("writer.lock"))
        assert mine["token"] != "theirs" and mine["pid"] == os.getpid() and mine["host"] == socket.gethostname()
    assert not store.exists("writer.lock")


def test_s3_lease_is_refreshed(s3_bucket):
    store = FsspecStore(s3_bucket, lease_ttl=4.0)  # refreshed every second: long enough that load cannot lapse it
    with store.lease("writer.lock", "the cache"):
        first = json.loads(store.read_text("writer.lock"))["expires"]
        for _ in range(400):  # a bound against a hang, not a timing
            if json.loads(store.read_text("writer.lock"))["expires"] > first:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the lease's expiry was never pushed forward")
        assert store.is_leased("writer.lock")


def test_s3_lease_taken_over_is_left_to_its_new_holder(s3_bucket):
    store = FsspecStore(s3_bucket, lease_ttl=600)  # no refresh during the test
    with store.lease("writer.lock", "the cache"):
        store.write_text("writer.lock", json.dumps({"host": "another-node", "pid": 1, "expires": 1e12, "token": "theirs"}))
    assert json.loads(store.read_text("writer.lock"))["token"] == "theirs"  # not deleted at exit


def test_s3_check_writable(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = open_store(s3_bucket + "/run")
    store.check_writable("--output")
    assert store.list() == [] and open_store(s3_bucket).list() == []

    store.write_text("config.json", "{}")
    with pytest.raises(UserError) as excinfo:
        store.child("config.json").check_writable("--output")
    assert one_line_error(excinfo) == f"--output {s3_bucket}/run/config.json is a file, not a folder"

    url = "s3://no-such-bucket-here/run"
    with pytest.raises(UserError) as excinfo:
        open_store(url).check_writable("--output")
    assert one_line_error(excinfo).startswith(f"--output {url}: not found")
    assert list(tmp_path.iterdir()) == []


def test_s3_unreachable_endpoint(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens once the socket is closed
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    url = s3_bucket + "/run"
    with pytest.raises(UserError) as excinfo:
        open_store(url).check_writable("--output")
    assert one_line_error(excinfo).startswith(f"--output {url}: cannot reach the storage")
    assert list(tmp_path.iterdir()) == []


def test_s3_wrong_credentials(s3_server, s3_bucket, monkeypatch):
    """moto checks signatures only with its IAM authentication on (off by default: any key is accepted), so a
    user with a key is made, authentication switched on for this test, and the right key is the control."""
    iam = boto3.client("iam")
    user = f"u{os.getpid()}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    url = s3_bucket + "/run"
    set_moto_auth(s3_server, "0")
    try:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        open_store(url).check_writable("--output")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        with pytest.raises(UserError) as excinfo:
            open_store(url).check_writable("--output")
        assert one_line_error(excinfo).startswith(f"--output {url}: access denied; check the credentials")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNUNKNOWN00")
        with pytest.raises(UserError, match="access denied"):
            open_store(url).check_writable("--output")
    finally:
        set_moto_auth(s3_server, "inf")


def set_moto_auth(endpoint: str, unauthenticated_requests: str) -> None:
    """After this many more requests moto checks every signature ("inf": never, its default)."""
    import urllib.request

    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=unauthenticated_requests.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})  # a form body would be parsed away
    urllib.request.urlopen(request).read()


def test_remote_errors_name_the_url(s3_bucket):
    url = s3_bucket + "/cache"
    with pytest.raises(UserError) as excinfo:
        with remote_errors(url):
            open_store(url).read_text("manifest.json")
    assert one_line_error(excinfo).startswith(f"{url}: not found")


def test_two_takers_of_one_stale_lease_exactly_one_wins(s3_bucket):
    """A killed holder's expired lease, and two reruns taking it over at once: S3's If-Match lets one replace it."""
    first, second = FsspecStore(f"{s3_bucket}/x"), FsspecStore(f"{s3_bucket}/x")
    first.write_bytes("l", json.dumps({"host": "elsewhere", "pid": 1, "expires": 0, "token": "dead"}).encode())
    replace = first._put_if_match

    def overtaken(path, body, etag):  # the second takes over between the first's judgement and its replace
        assert second._take(second._path("l"), "second") is not None
        return replace(path, body, etag)

    first._put_if_match = overtaken
    assert first._take(first._path("l"), "first") is None
    assert json.loads(first.read_bytes("l"))["token"] == "second"


@pytest.mark.parametrize("where", ["s3", "memory"])
def test_a_lease_released_while_a_taker_looks_is_taken(request, where):
    """A holder lets go between a taker's failed create and its look at the lease (two Ray workers finishing
    together): the taker creates it once more. On S3 it used to send If-Match with no ETag (a botocore
    ParamValidationError that stopped the dump)."""
    url = request.getfixturevalue("s3_bucket") + "/y" if where == "s3" else f"memory://lease-{os.getpid()}"
    store = FsspecStore(url)
    store.write_text("l", json.dumps({"host": "elsewhere", "pid": 1, "expires": 1e12, "token": "holder"}))
    create, released = store._create, []

    def holder_lets_go(path, body):
        made = create(path, body)
        if not released:
            released.append(store.fs.rm_file(path))
        return made

    store._create = holder_lets_go
    with store.lease("l", "the cache"):
        assert released and json.loads(store.read_text("l"))["pid"] == os.getpid()
    assert not store.exists("l")


def test_unfinished_uploads_are_discarded_under_their_prefix_only(s3_bucket):
    import boto3

    store = open_store(f"{s3_bucket}/cache")
    client, bucket = boto3.client("s3"), s3_bucket.removeprefix("s3://")
    for key in ("cache/shard-w00000-00001-dead.arrow", "cache/shard-w00001-00000-live.arrow", "elsewhere/x"):
        client.create_multipart_upload(Bucket=bucket, Key=key)
    store.discard_unfinished("shard-w00000")
    left = sorted(u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))
    assert left == ["cache/shard-w00001-00000-live.arrow", "elsewhere/x"]


def test_remote_errors_keep_the_line_a_first_line_announces():
    botocore = pytest.importorskip("botocore.exceptions")
    with pytest.raises(UserError) as excinfo:
        with remote_errors("s3://b/c", "--output"):
            raise botocore.ParamValidationError(report="Invalid type for parameter IfMatch, value: None")
    assert one_line_error(excinfo) == ("--output s3://b/c: cannot reach the storage (ParamValidationError: Parameter validation "
                                       "failed: Invalid type for parameter IfMatch, value: None)")


def test_a_lease_the_store_says_exists_and_is_absent_counts_as_held(monkeypatch):
    """A listing cache that keeps saying "absent" for a lease whose create fails (gcsfs, adlfs keep one): a few fresh
    looks, then the lease counts as held (one line), never an endless loop of requests."""
    store = FsspecStore(f"memory://stale-listing-{os.getpid()}")
    looks = []
    monkeypatch.setattr(store, "_create", lambda path, body: looks.append(path) and False)
    with pytest.raises(UserError, match="another process is already writing"):
        with store.lease("l", "the cache"):
            pass
    from taid_cache.storage.remote import LOOKS

    assert len(looks) == LOOKS
