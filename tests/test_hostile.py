"""A hostile user's afternoon (issue #21), each kind tried with several examples.

Secrets in storage URLs stay masked whatever characters a password holds; the dashboard answers
only requests that name this machine, and listens on IPv6 loopback too; config and space files are
bounded (aliases, huge strings, a key given twice, a number YAML 1.1 reads as a string) before
anything is built; no output lands inside a data folder or replaces a file when its command fails;
reading a storage never writes to it; and the report prints no library's warning. Every user error
is one line on stderr, exit code 2, and nothing written.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import optuna
import pytest
import torch
import yaml
from PIL import Image
from sqlalchemy.engine import make_url

import kdsearch.export
from kdsearch.dashboard import host_allowed
from kdsearch.errors import UserError, shown
from kdsearch.storage import redact, redact_text
from kdsearch.structured import MAX_STRING, dump_yaml, read_structured_file
from tests.helpers import POSTGRES_URL, StubTrainer, files_under, load_study, optimize_args, postgres_available, run_cli

# Passwords holding each character a URL gives a meaning to; every piece ("s3cr", "etpw") is secret.
PASSWORDS = ("s3cr/etpw", "s3cr@etpw", "s3cr?etpw", "s3cr#etpw", "s3cr:etpw", "s3cr/@?#:etpw", "s3cr%2Fetpw")
SECRET_PIECES = ("s3cr", "etpw")


class Response(NamedTuple):
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def one_line_error(code: int, out: str, err: str) -> str:
    """Assert a user error: exit 2, nothing on stdout, one line on stderr; returns that line."""
    assert code == 2, (out, err)
    assert out == "" and err.count("\n") == 1 and err.startswith("kdsearch: error: "), err
    return err


def digest(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` by relative path, with the SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files_under(folder)}


# --- 1a. credentials ------------------------------------------------------------------------------


@pytest.mark.parametrize("password", PASSWORDS)
def test_a_password_is_masked_whatever_characters_it_holds(password: str) -> None:
    url = f"postgresql+psycopg2://kd:{password}@db.example:5432/kd?sslmode=require"
    shown_url = redact(url)
    assert shown_url.startswith("postgresql+psycopg2://kd:***@")
    assert not any(piece in shown_url for piece in SECRET_PIECES), shown_url
    if "@" not in password:  # an unencoded @ is misread by SQLAlchemy too; otherwise the rest is kept as it was
        assert make_url(shown_url).host == "db.example" and make_url(shown_url).query == {"sslmode": "require"}
    parsed = make_url(url)  # a driver's error may quote the URL, the decoded password, the host it read
    message = f"could not connect with {url} (password {parsed.password!r}, host {parsed.host!r})"
    assert not any(piece in redact_text(message, url) for piece in SECRET_PIECES)


def test_a_url_that_does_not_parse_is_masked_up_to_its_last_at() -> None:
    for url in ("postgresql://kd:s3cr/etpw@db:notaport/kd", "weird://kd:s3cr@etpw@", "mysql://:s3cr#etpw@[::1/x"):
        assert not any(piece in redact(url) for piece in SECRET_PIECES), redact(url)
    assert redact("sqlite:///studies/kd@home.db") == "sqlite:///studies/kd@home.db"  # no password to mask


@pytest.mark.parametrize("password", PASSWORDS)
def test_a_password_never_reaches_an_error_of_any_command(
    password: str, search, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"postgresql+psycopg2://kd:{password}@127.0.0.1:1/kd"  # nothing listens on port 1
    commands = [
        ["studies", "--storage", url],
        ["export", "--study-name", "s", "--storage", url],
        ["report", "--study-name", "s", "--storage", url, "-o", tmp_path / "r.html"],
        ["dashboard", "--storage", url, "--port", "0"],
        ["confirm", "--study-name", "s", "--storage", url],
    ]
    before = files_under(tmp_path)
    results = [run_cli(command, capsys) for command in commands] + [search("--trials", "1", "--storage", url)]
    for code, out, err in results:
        err = one_line_error(code, out, err)
        assert "***" in err and not any(piece in err for piece in SECRET_PIECES), err
    assert files_under(tmp_path) == before


# --- 1b, 1c. the dashboard ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "bound", "allowed"),
    [
        ("127.0.0.1:8080", "127.0.0.1", True),
        ("127.3.4.5", "127.0.0.1", True),
        ("localhost:8080", "127.0.0.1", True),
        ("LOCALHOST.:8080", "127.0.0.1", True),
        ("[::1]:8080", "::1", True),
        ("kd.lan:8080", "kd.lan", True),
        ("192.168.1.5:8080", "0.0.0.0", True),
        ("evil.example.com", "127.0.0.1", False),
        ("evil.example.com:8080", "0.0.0.0", False),
        ("127.0.0.1.evil.example.com", "127.0.0.1", False),
        ("localhost.evil.example.com:8080", "127.0.0.1", False),
        ("[::2]:8080", "127.0.0.1", False),
        ("192.168.1.5:8080", "127.0.0.1", False),
        ("", "127.0.0.1", False),
        (None, "127.0.0.1", False),
    ],
)
def test_the_dashboard_allows_only_hosts_that_name_this_machine(header: str | None, bound: str, allowed: bool) -> None:
    assert host_allowed(header, bound) is allowed


@contextmanager
def running_dashboard(home: Path, *args: str, limit: float = 120) -> Iterator[tuple[int, list[str]]]:
    """`kdsearch dashboard --port 0 ARGS` in a child that ``timeout`` stops after ``limit`` s whatever
    happens here; yields its port and the lines it logged up to "dashboard for"."""
    env = {**os.environ, "KDSEARCH_HOME": str(home)}
    command = ["timeout", str(limit), sys.executable, "-m", "kdsearch", "dashboard", "--port", "0", *args]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 60
        while not any("dashboard for" in line for line in lines):
            ready, _, _ = select.select([process.stderr], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"the dashboard logged no address in 60 s: {lines}"
            line = process.stderr.readline()
            assert line, f"the dashboard stopped: {lines}"
            lines.append(line.strip())
        port = re.search(r":(\d+)/$", lines[-1])
        assert port, lines
        yield int(port.group(1)), lines
    finally:
        process.terminate()
        process.wait(timeout=20)


def request(port: int, method: str, path: str, host: str | None, address: str = "127.0.0.1") -> Response:
    """One bounded request with exactly the Host header given (none for None); the response read whole."""
    connection = http.client.HTTPConnection(address, port, timeout=10)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            connection.putheader("Host", host)
        connection.endheaders()
        response = connection.getresponse()
        return Response(response.status, response.getheaders(), response.read())
    finally:
        connection.close()


@pytest.mark.slow
def test_the_dashboard_refuses_other_hosts_and_grants_no_other_origin(search, home: Path) -> None:
    """DNS rebinding: a page of evil.example.com resolved to 127.0.0.1 may neither read nor delete."""
    assert search("--trials", "1")[0] == 0
    study = load_study(home, "kd-imagefolder")
    trial = study.trials[0]
    artifact = trial.user_attrs["artifact_id"]
    with running_dashboard(home) as (port, lines):
        assert lines == [f"kdsearch: dashboard for sqlite:///{home / 'kdsearch.db'} at http://127.0.0.1:{port}/"]
        listing = json.loads(request(port, "GET", "/api/studies", f"127.0.0.1:{port}").body)
        (summary,) = listing["study_summaries"]
        study_id = summary["study_id"]
        for host in ("evil.example.com", f"evil.example.com:{port}", "127.0.0.1.evil.example.com", "[::2]"):
            for method, path in (("DELETE", f"/api/studies/{study_id}"), ("GET", "/api/studies"), ("GET", "/")):
                assert request(port, method, path, host).status == 403, (host, method, path)
        assert request(port, "GET", "/api/studies", None).status == 403  # no Host header at all
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"127.0.0.2:{port}", f"[::1]:{port}"):
            assert request(port, "GET", "/api/studies", host).status == 200, host
        download = request(port, "GET", f"/artifacts/{study_id}/{trial._trial_id}/{artifact}", f"localhost:{port}")
        assert download.status == 200
        assert not any(name.lower().startswith("access-control-allow") for name, _ in download.headers)
    assert [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{home / 'kdsearch.db'}")] == [
        "kd-imagefolder"
    ]


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_the_dashboard_listens_on_ipv6_loopback(search, home: Path) -> None:
    if not _ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback")
    assert search("--trials", "1")[0] == 0
    for host in ("::1", "[::1]"):
        with running_dashboard(home, "--host", host) as (port, lines):
            assert lines[-1].endswith(f"at http://[::1]:{port}/") and len(lines) == 1, lines  # loopback: no warning
            assert request(port, "GET", "/api/studies", f"[::1]:{port}", address="::1").status == 200
            assert request(port, "GET", "/api/studies", "evil.example.com", address="::1").status == 403


@pytest.mark.parametrize("host", ["", " ", "[]", "http://127.0.0.1", "local host"])
def test_a_host_that_cannot_be_listened_on_is_one_line(
    host: str, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = one_line_error(*run_cli(["dashboard", "--host", host, "--port", "0"], capsys))
    assert "--host must be" in err and not home.exists()


# --- 1d. config and space files -------------------------------------------------------------------


def laughs(levels: int) -> str:
    """A YAML "billion laughs": ``levels`` lists of nine aliases to the one before, 9**levels leaves."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


HOSTILE_FILES: dict[str, tuple[str, str, str]] = {
    # name: (file name, content, what the one line says)
    "billion laughs": ("laughs.yaml", laughs(9), "aliases expand"),
    "laughs inside a value": ("laughs2.yaml", laughs(7) + "method: *l7\n", "aliases expand"),
    "an alias inside itself": ("loop.yaml", "a: &a [1, *a]\n", "refers to a value that contains it"),
    "a mapping inside itself": ("loop2.yaml", "a: &a {b: *a}\n", "refers to a value that contains it"),
    "a key twice": ("twice.yaml", "method: kd\nmethod: dkd\n", "key 'method' is given twice"),
    "a nested key twice": ("nested.yaml", "parameters:\n  lr: {low: 1, high: 2, low: 3}\n", "key 'low' is given twice"),
    "a json key twice": ("twice.json", '{"method": "kd", "method": "dkd"}', "key 'method' is given twice"),
    "a nested json key twice": ("nested.json", '{"parameters": {"lr": {"low": 1, "low": 2}}}', "key 'low'"),
    "1e-5": ("exp.yaml", "parameters:\n  lr: {low: 1e-5, high: 1.0e-2}\n", "write 1.0e-5"),
    "1E5": ("exp2.yaml", "parameters:\n  lr: {low: 1.0e-5, high: 1E5}\n", "write 1.0e+5"),
    "-2.5e3": ("exp3.yaml", "recipe:\n  lr: -2.5e3\n", "write -2.5e+3"),
    "deep nesting": ("deep.yaml", "a: " + "[" * 20000 + "]" * 20000 + "\n", "not valid YAML"),
}


def huge(path: Path, kind: str, size: int = 50_000_000) -> Path:
    value = "x" * size
    if kind == "json":
        path.write_text(json.dumps({"method": value}))
    elif kind == "key":
        path.write_text(f"? {value}\n: 1\n")  # an explicit key: a plain one may not pass 1024 characters
    else:
        path.write_text(f"method: {value}\n")
    return path


@pytest.mark.parametrize("case", sorted(HOSTILE_FILES))
def test_a_hostile_file_is_one_line_before_anything_is_built(case: str, tmp_path: Path) -> None:
    name, content, expected = HOSTILE_FILES[case]
    path = tmp_path / name
    path.write_text(content)
    started = time.monotonic()
    with pytest.raises(UserError) as raised:
        read_structured_file(path, "config file")
    message = str(raised.value)
    assert time.monotonic() - started < 10 and len(message) < 400, message[:400]
    assert message.startswith(f"config file {path}") and expected in message, message


@pytest.mark.parametrize("kind", ["yaml", "json", "key"])
def test_a_huge_value_is_quoted_in_a_few_dozen_characters(kind: str, tmp_path: Path) -> None:
    path = huge(tmp_path / f"big.{'json' if kind == 'json' else 'yaml'}", kind)
    with pytest.raises(UserError) as raised:
        read_structured_file(path, "search-space file")
    message = str(raised.value)
    # The message's own words and its quote, whatever the length of the temporary path it names.
    assert len(message.replace(str(path), "")) < 250, message[:300]
    assert "50,000,000 characters" in message and "too long" in message, message[:300]
    assert len(shown("y" * 10_000_000)) < 120 and len(shown({"k": ["z" * 10**6] * 10**3})) < 120


def test_what_a_file_may_hold_is_still_read(tmp_path: Path) -> None:
    """Anchors within the bound, merge keys overriding, quoted numbers-as-strings, long-enough paths."""
    path = tmp_path / "ok.yaml"
    path.write_text(
        "base: &base {low: 1.0e-5, high: 0.1}\nparameters:\n  lr:\n    <<: *base\n    high: 0.01\n"
        f"  other: *base\nname: '1e-5'\ndir: {'d' * MAX_STRING}\n{laughs(4)}"
    )
    data = read_structured_file(path, "config file")
    assert data["parameters"]["lr"] == {"low": 1.0e-5, "high": 0.01} and data["name"] == "1e-5"
    assert data["parameters"]["other"] == {"low": 1.0e-5, "high": 0.1} and len(data["dir"]) == MAX_STRING
    assert len(data["l4"]) == 9 and data["l4"][8][8][8][8] == ["lol"] * 9  # 6,561 leaves from aliases: allowed


def test_every_string_kdsearch_writes_reads_back(tmp_path: Path) -> None:
    values = {"study": "1e5", "other": "2.5E-3", "plain": "kd", "number": 1e-5, "list": ["1e-5", 3]}
    path = tmp_path / "written.yaml"
    path.write_text(dump_yaml(values))
    assert read_structured_file(path, "config file") == values == yaml.safe_load(path.read_text())


@pytest.mark.parametrize("case", ["billion laughs", "an alias inside itself", "a key twice", "1e-5", "huge"])
def test_space_and_config_files_are_refused_by_every_command(
    case: str, search, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if case == "huge":
        path = huge(tmp_path / "huge.yaml", "yaml", 5_000_000)
    else:
        name, content, _ = HOSTILE_FILES[case]
        path = tmp_path / name
        path.write_text(content)
    before = files_under(tmp_path)
    for result in (
        search("--trials", "1", "--space", path),
        run_cli(["train", "--config", path, "--out", tmp_path / "s.pt"], capsys),
    ):
        err = one_line_error(*result)
        assert len(err) < 400 and str(path) in err, err[:400]
    assert files_under(tmp_path) == before and not home.exists()


# --- 2a. no output inside a data folder -----------------------------------------------------------


@pytest.fixture()
def data_copy(pattern_folder: Path, tmp_path: Path) -> Path:
    """A private copy of the pattern image folder: a test that failed would spoil only its own."""
    return Path(shutil.copytree(pattern_folder, tmp_path / "data"))


def inside_outputs(data: Path, tmp_path: Path) -> list[Path]:
    """Outputs inside the data folder: an image, a new file in a class folder, one beside the splits,
    and the same through a symbolic link to the folder."""
    link = tmp_path / "link"
    link.symlink_to(data)
    return [
        data / "train" / "class0" / "000.png",
        data / "train" / "class3" / "new.pt",
        data / "student.pt",
        link / "test" / "class1" / "005.png",
    ]


def test_train_and_teacher_never_write_inside_their_data_folder(
    data_copy: Path, untrained_teacher: Path, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--dataset", "imagefolder", "--data-dir", data_copy, "--val-size", "50", "--epochs", "1", "-q"]
    before = digest(data_copy)
    for out in inside_outputs(data_copy, tmp_path):
        for command in (
            ["train", "--method", "ce", *data, "--out", out],
            ["train", "--method", "kd", "--teacher", untrained_teacher, *data, "--out", out],
            ["teacher", *data, "--out", out],
        ):
            err = one_line_error(*run_cli(command, capsys))
            assert "out " in err and "inside" in err and "a folder this command reads" in err, err
    assert digest(data_copy) == before and not home.exists()


def test_export_and_report_never_write_inside_the_studys_data_folder(
    data_copy: Path, untrained_teacher: Path, home: Path, stub: StubTrainer, tmp_path: Path, capsys
) -> None:
    assert run_cli(optimize_args(data_copy, untrained_teacher, "--trials", "2"), capsys)[0] == 0
    before, home_before = digest(data_copy), files_under(home)
    name = ["--study-name", "kd-imagefolder"]
    for out in inside_outputs(data_copy, tmp_path):
        yaml_out, html_out = out.with_suffix(".yaml"), out.with_suffix(".html")
        for command, option in (
            (["export", *name, "-o", yaml_out], "--output"),
            (["export", *name, "--checkpoint", out], "--checkpoint"),
            (["export", *name, "-o", tmp_path / "ok.yaml", "--checkpoint", out], "--checkpoint"),
            (["report", *name, "-o", html_out], "--output"),
            (["report", *name, "-o", tmp_path / "ok.html", "--png", out.parent / "plots"], "--png"),
        ):
            err = one_line_error(*run_cli(command, capsys))
            assert option in err and "inside" in err, (command, err)
    assert digest(data_copy) == before and files_under(home) == home_before
    assert not (tmp_path / "ok.yaml").exists() and not (tmp_path / "ok.html").exists()
    best = tmp_path / "best"  # one output may not be the folder of another
    for config, checkpoint in ((best / "best.yaml", best), (best.with_suffix(".yaml"), best.with_suffix(".yaml"))):
        err = one_line_error(*run_cli(["export", *name, "-o", config, "--checkpoint", checkpoint], capsys))
        assert "another output" in err, err
    assert not best.exists() and not best.with_suffix(".yaml").exists()
    code, _, err = run_cli(["export", *name, "-o", best / "best.yaml", "--checkpoint", best / "best.pt"], capsys)
    assert code == 0 and files_under(best) == {best / "best.yaml", best / "best.pt"}, err


# --- 2b. both or neither, and the old files stay ----------------------------------------------------


@pytest.fixture()
def exported_study(search, home: Path) -> list[str]:
    assert search("--trials", "2")[0] == 0
    return ["export", "--study-name", "kd-imagefolder"]


def small_mount(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``where`` with ``options`` (read-only, or a few kilobytes), or a skip saying why."""
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield where
    finally:
        # Lazy: a file a failed write left open (its exception still referenced) must not keep it mounted.
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture()
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: room for an old checkpoint, none for a new one."""
    yield from small_mount(tmp_path / "full", "size=64k")


@pytest.fixture()
def read_only_place(tmp_path: Path) -> Iterator[Path]:
    yield from small_mount(tmp_path / "ro", "ro,size=64k")


def assert_untouched(old: dict[Path, bytes], *folders: Path) -> None:
    """The old files hold their old bytes, and no temporary file is left beside them."""
    for path, content in old.items():
        assert path.read_bytes() == content, path
    for folder in folders:
        assert not [p for p in folder.glob(".*.tmp")], list(folder.iterdir())


def test_export_to_an_unwritable_place_keeps_the_old_checkpoint(
    exported_study: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    best, config = tmp_path / "best.pt", tmp_path / "best.yaml"
    old = {best: b"the old checkpoint", config: b"old: config\n"}
    for path, content in old.items():
        path.write_bytes(content)
    for unwritable in (Path("/proc/kdsearch-export/best.yaml"), Path("/proc/best.yaml")):
        err = one_line_error(*run_cli([*exported_study, "-o", unwritable, "--checkpoint", best], capsys))
        assert "--output" in err and "cannot write" in err, err
        assert_untouched(old, tmp_path)
    err = one_line_error(*run_cli([*exported_study, "-o", config, "--checkpoint", "/proc/best.pt"], capsys))
    assert "--checkpoint" in err and "cannot write" in err, err
    assert_untouched(old, tmp_path)


def test_export_to_a_read_only_or_full_disk_keeps_the_old_files(
    exported_study: list[str], read_only_place: Path, full_disk: Path, tmp_path: Path, capsys
) -> None:
    best, full_best, config = tmp_path / "best.pt", full_disk / "best.pt", tmp_path / "best.yaml"
    old = {best: b"old", full_best: b"old", config: b"old: config\n"}
    for path, content in old.items():
        path.write_bytes(content)
    err = one_line_error(*run_cli([*exported_study, "-o", read_only_place / "x.yaml", "--checkpoint", best], capsys))
    assert "--output" in err and "read-only file system" in err.lower(), err
    err = one_line_error(*run_cli([*exported_study, "-o", config, "--checkpoint", full_best], capsys))
    assert "--checkpoint" in err and "No space left" in err, err
    assert_untouched(old, tmp_path, full_disk)


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_failure_while_writing_the_second_file_keeps_both_old_files(
    failure: BaseException,
    exported_study: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A full disk, or Ctrl-C, while the config is written: the checkpoint fetched first is not kept."""
    best, config = tmp_path / "best.pt", tmp_path / "best.yaml"
    old = {best: b"the old checkpoint", config: b"old: config\n"}
    for path, content in old.items():
        path.write_bytes(content)
    real_write_text = Path.write_text

    def failing_write_text(self: Path, *args: object, **kwargs: object) -> int:
        if self.name.startswith(".best.yaml."):
            raise failure
        return real_write_text(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", failing_write_text)
    code, out, err = run_cli([*exported_study, "-o", config, "--checkpoint", best], capsys)
    if isinstance(failure, KeyboardInterrupt):
        assert code == 130 and err.strip() == "kdsearch: interrupted", err
    else:
        assert "--output" in one_line_error(code, out, err)
    assert_untouched(old, tmp_path)


def test_a_missing_artifact_keeps_the_old_files(
    exported_study: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    best, config = tmp_path / "best.pt", tmp_path / "best.yaml"
    old = {best: b"the old checkpoint", config: b"old: config\n"}
    for path, content in old.items():
        path.write_bytes(content)
    monkeypatch.setenv("KDSEARCH_ARTIFACTS", str(tmp_path / "no-artifacts"))
    err = one_line_error(*run_cli([*exported_study, "-o", config, "--checkpoint", best], capsys))
    assert "is missing" in err
    assert_untouched(old, tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "one byte changed", "replaced by another checkpoint"])
def test_a_damaged_artifact_is_refused_and_keeps_the_old_files(
    damage: str, exported_study: list[str], home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = load_study(home, "kd-imagefolder")
    kept = [t for t in study.get_trials() if "artifact_id" in t.user_attrs]
    assert kept and all(len(t.user_attrs["artifact_sha256"]) == 64 for t in kept)
    best_id = kdsearch.export.best_trials(study, 1)[0].user_attrs["artifact_id"]
    artifact = next(p for p in files_under(home) if p.name == best_id)
    content = artifact.read_bytes()
    if damage == "truncated":
        artifact.write_bytes(content[: len(content) // 2])
    elif damage == "one byte changed":
        artifact.write_bytes(content[:-100] + bytes([content[-100] ^ 1]) + content[-99:])
    else:
        torch.save({"weight": torch.zeros(3)}, artifact)  # a readable checkpoint, not the trial's
    best, config = tmp_path / "best.pt", tmp_path / "best.yaml"
    old = {best: b"the old checkpoint", config: b"old: config\n"}
    for path, written in old.items():
        path.write_bytes(written)
    err = one_line_error(*run_cli([*exported_study, "-o", config, "--checkpoint", best], capsys))
    assert "is damaged" in err and artifact.name in err
    assert_untouched(old, tmp_path)


def test_report_to_an_unwritable_png_folder_writes_no_html(
    exported_study: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    html = tmp_path / "r.html"
    html.write_text("old report")
    before = files_under(tmp_path)
    for png in ("/proc/kdsearch-plots", "/proc/self/kdsearch-plots"):
        err = one_line_error(*run_cli(["report", "--study-name", "kd-imagefolder", "-o", html, "--png", png], capsys))
        assert "--png" in err and "cannot write" in err, err
    assert html.read_text() == "old report" and files_under(tmp_path) == before


# --- 2c. reading a storage never writes ------------------------------------------------------------

READERS: list[Callable[[str, Path], list[object]]] = [
    lambda url, tmp: ["export", "--study-name", "kd", "--storage", url],
    lambda url, tmp: ["report", "--study-name", "kd", "--storage", url, "-o", tmp / "r.html"],
    lambda url, tmp: ["dashboard", "--storage", url, "--port", "0"],
    lambda url, tmp: ["confirm", "--study-name", "kd", "--storage", url],
]


def test_listing_an_empty_database_file_leaves_it_empty(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    before = files_under(tmp_path)
    url = f"sqlite:///{empty}"
    for fmt, expected in (("json", []), ("yaml", [])):
        code, out, err = run_cli(["studies", "-f", fmt, "--storage", url], capsys)
        assert code == 0 and yaml.safe_load(out) == expected and err == f"kdsearch: no kdsearch studies in {url}\n"
    code, out, err = run_cli(["studies", "--storage", url], capsys)
    assert (code, out, err) == (0, f"no kdsearch studies in {url}\n", "")
    for reader in READERS:
        err = one_line_error(*run_cli(reader(url, tmp_path), capsys))
        assert "no" in err and str(empty) in err, err
    assert empty.stat().st_size == 0 and files_under(tmp_path) == before


@pytest.fixture()
def scratch_database() -> Iterator[str]:
    """A PostgreSQL database of a random name, dropped at the end (a skip with the reason when the server is down)."""
    if not postgres_available():
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}")
    import sqlalchemy

    name = f"kdsearch_hostile_{uuid.uuid4().hex[:12]}"
    server = make_url(POSTGRES_URL)
    admin = sqlalchemy.create_engine(server.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def tables_of(url: str) -> set[str]:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            return set(sqlalchemy.inspect(connection).get_table_names())
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_reading_a_database_of_other_tables_creates_none(
    scratch_database: str, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlalchemy

    before = files_under(tmp_path)
    for tables in (set(), {"invoices"}):
        if tables:
            engine = sqlalchemy.create_engine(scratch_database)
            with engine.begin() as connection:
                connection.execute(sqlalchemy.text("CREATE TABLE invoices (id integer primary key)"))
            engine.dispose()
        code, out, err = run_cli(["studies", "-f", "json", "--storage", scratch_database], capsys)
        assert code == 0 and json.loads(out) == [] and "no kdsearch studies in" in err, err
        assert run_cli(["studies", "--storage", scratch_database], capsys)[1].startswith("no kdsearch studies in")
        for reader in READERS:
            one_line_error(*run_cli(reader(scratch_database, tmp_path), capsys))
        assert tables_of(scratch_database) == tables
    assert files_under(tmp_path) == before


@pytest.mark.postgres
@pytest.mark.slow
def test_a_password_with_a_slash_is_masked_in_the_summary_the_export_and_the_dashboard(
    scratch_database: str, search, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Trust authentication ignores the password, so the real server takes URLs holding any."""
    parsed = make_url(scratch_database)
    url = f"postgresql+psycopg2://{parsed.username}:s3cr/etpw?x#y:z@{parsed.host}:{parsed.port}/{parsed.database}"
    code, out, err = search("--trials", "1", "--storage", url, "--json")
    assert code == 0, err
    exported = tmp_path / "best.yaml"
    results = [
        (code, out, err),
        run_cli(["export", "--study-name", "kd-imagefolder", "--storage", url, "-o", exported], capsys),
        run_cli(["studies", "--storage", url], capsys),
        run_cli(["export", "--study-name", "nope", "--storage", url], capsys),
    ]
    with running_dashboard(home, "--storage", url) as (_, lines):
        shown_lines = "\n".join(lines)
    texts = [text for result in results for text in result[1:]] + [exported.read_text(), shown_lines]
    for text in texts:
        assert not any(piece in text for piece in SECRET_PIECES), text
    assert json.loads(out)["storage"].startswith(f"postgresql+psycopg2://{parsed.username}:***@")
    assert yaml.safe_load(exported.read_text())["source"]["storage"] == redact(url)
    assert "postgres:***@" in shown_lines


# --- 3. no library's noise --------------------------------------------------------------------------


def report_stderr(home: Path, *args: object) -> list[str]:
    """`kdsearch report ARGS` in a child process (warnings and log lines reach stderr as a user sees them)."""
    env = {**os.environ, "KDSEARCH_HOME": str(home), "PYTHONWARNINGS": "default"}
    done = subprocess.run(
        [sys.executable, "-m", "kdsearch", "report", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stderr.splitlines()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_report_prints_no_library_warning(
    search, home: Path, stub: StubTrainer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A label too long for matplotlib's tight layout, and a `-confirm` study that reports no epochs."""
    assert search("--trials", "3", "--pruner", "none")[0] == 0
    code, _, err = run_cli(["confirm", "--study-name", "kd-imagefolder", "--top", "1", "--seeds", "2", "-q"], capsys)
    assert code == 0, err
    study = load_study(home, "kd-imagefolder")
    study.set_metric_names(["validation accuracy of the student on the held-out split, in percent " * 3])
    for name in ("kd-imagefolder", "kd-imagefolder-confirm"):
        lines = report_stderr(home, "--study-name", name, "-o", tmp_path / f"{name}.html", "--png", tmp_path / name)
        assert lines and all(line.startswith("kdsearch: ") for line in lines), lines
        assert (tmp_path / f"{name}.html").exists() and list((tmp_path / name).glob("*.png"))


def test_train_config_refuses_a_teacher_that_is_not_the_searched_one(
    pattern_folder: Path, untrained_teacher: Path, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An exported config records the teacher's checksum; another file at that path is refused before training."""
    import hashlib

    from kdsearch.config import RunConfig

    config = RunConfig.read(
        {"dataset": "imagefolder", "data_dir": str(pattern_folder), "val_size": 0, "epochs": 1,
         "teacher": str(untrained_teacher), "method": "kd"}
    ).to_dict()  # fmt: skip
    real = hashlib.sha256(untrained_teacher.read_bytes()).hexdigest()
    for recorded, code_wanted in (("f" * 64, 2), (real, 0)):
        path = tmp_path / f"best-{recorded[:4]}.yaml"
        path.write_text(yaml.safe_dump(config | {"source": {"teacher_sha256": recorded}}))
        code, _, err = run_cli(["train", "--config", str(path), "--json", "-q"], capsys)
        assert code == code_wanted, err
        if code_wanted == 2:
            assert err.count("\n") == 1 and f"config {path}: models.teacher " in err
            assert "is not the teacher this config was searched with (sha256" in err
    # Another --teacher given on the command line is the user's choice: no check against the record.
    path = tmp_path / "best-ffff.yaml"
    args = ["train", "--config", str(path), "--teacher", str(untrained_teacher), "-q", "--json"]
    assert run_cli(args, capsys)[0] == 0


@pytest.mark.parametrize("kind", ["file", "under a file", "read-only"])
def test_an_unusable_artifact_folder_is_refused_before_any_trial(
    kind: str, search, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stub: StubTrainer
) -> None:
    target = tmp_path / "artifacts"
    if kind == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        target.mkdir()
        target.chmod(0o500)
    else:
        target.write_text("not a folder")
        if kind == "under a file":
            target = target / "inner"
    monkeypatch.setenv("KDSEARCH_ARTIFACTS", str(target))
    code, _, err = search("--trials", "1")
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"kdsearch: error: KDSEARCH_ARTIFACTS {target} ")
    assert stub.runs == [] and not (home / "kdsearch.db").exists()


def test_image_folder_mistakes_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A class that has test images but no training images; a class folder that is a symlink loop."""
    root = tmp_path / "data"
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
    for split, name in (("train", "cat"), ("test", "cat"), ("test", "dog")):
        Image.new("RGB", (8, 8)).save(root / split / name / "0.png")
    args = ["train", "--dataset", "imagefolder", "--data-dir", str(root), "--val-size", "0", "--method", "ce", "-q"]
    code, _, err = run_cli(args, capsys)
    assert (
        code == 2
        and err == f"kdsearch: error: {root}/train/dog holds no image files: every class needs training images\n"
    )
    (root / "train" / "dog").rmdir()
    (root / "train" / "dog").symlink_to(root / "train" / "dog")
    code, _, err = run_cli(args, capsys)
    assert code == 2 and err.startswith(f"kdsearch: error: {root}/train/dog") and err.count("\n") == 1, err
    (root / "train" / "dog").unlink()
    (root / "train" / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(root / "train" / "dog" / "0.png")
    (root / "train" / "cat" / "loop.png").symlink_to(root / "train" / "cat" / "loop.png")  # a file that is a loop
    code, _, err = run_cli(args, capsys)
    assert (
        code == 2
        and err.startswith(f"kdsearch: error: {root}/train/cat/loop.png cannot be read: ")
        and (err.count("\n") == 1)
    ), err


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs: too small for a cache and the margin kept beside it."""
    yield from small_mount(tmp_path / "small-disk", "size=2M")


def test_a_cache_the_disk_cannot_hold_is_one_line_and_leaves_nothing(
    small_disk: Path, pattern_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KDSEARCH_HOME", str(small_disk / "home"))
    args = ["train", "--dataset", "imagefolder", "--data-dir", str(pattern_folder), "--val-size", "0",
            "--method", "ce", "--epochs", "1", "-q"]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("kdsearch: error: the decoded-image cache needs ") and "free; free some space" in err
    assert [p for p in small_disk.rglob("*") if p.is_file()] == []


def test_a_disk_that_fills_up_while_a_cache_is_written_is_one_line_and_leaves_nothing(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The free space looked enough (another process filled the disk meanwhile): the write fails, cleanly."""
    import shutil

    import torch

    from kdsearch.errors import UserError
    from kdsearch.fsutil import save_verified

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40))
    with pytest.raises(UserError, match=r"the disk filled up writing the teacher-output cache in .*; nothing was kept"):
        save_verified(small_disk / "c.pt", {"format": 1}, {"logits": torch.zeros(1 << 20)}, "teacher-output")
    assert list(small_disk.iterdir()) == []


def test_sqlite_uris_are_read_as_sqlite_reads_them_and_read_only_means_no_write(
    search, home: Path, stub: StubTrainer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert search("--trials", "1")[0] == 0
    database = home / "kdsearch.db"
    before = (database.stat().st_mtime_ns, database.read_bytes())
    read_only = f"sqlite:///file:{database}?mode=ro&uri=true"
    code, out, err = run_cli(["studies", "--storage", read_only, "-f", "json"], capsys)
    assert code == 0 and [row["name"] for row in json.loads(out)] == ["kd-imagefolder"], err
    assert run_cli(["export", "--study-name", "kd-imagefolder", "--storage", read_only], capsys)[0] == 0
    for command in (["optimize", "--trials", "1"], ["confirm", "--study-name", "kd-imagefolder"]):
        if command[0] == "optimize":
            code, _, err = search("--trials", "1", "--storage", read_only)
        else:
            code, _, err = run_cli([*command, "--storage", read_only], capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert "is opened read-only (mode=ro): this command writes to it" in err
    assert (database.stat().st_mtime_ns, database.read_bytes()) == before
    # Without uri=true SQLAlchemy would ignore mode=ro (and make a file named "file:…"): refused, said why.
    for url in (f"sqlite:///{database}?mode=ro", f"sqlite:///file:{database}"):
        code, _, err = run_cli(["studies", "--storage", url], capsys)
        assert code == 2 and "takes effect only as a SQLite URI, with uri=true" in err and err.count("\n") == 1
    assert sorted(p.name for p in home.iterdir() if p.name.startswith("file:")) == []


def test_a_teacher_with_nan_weights_is_named_not_blamed_on_the_learning_rate(
    pattern_folder: Path, untrained_teacher: Path, tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    checkpoint = torch.load(untrained_teacher, weights_only=True)
    state = checkpoint["state_dict"] if "state_dict" in checkpoint else checkpoint
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = torch.full_like(state[key], float("nan"))
    broken = tmp_path / "nan-teacher.pt"
    torch.save(checkpoint, broken)
    args = ["train", "--method", "kd", "--dataset", "imagefolder", "--data-dir", str(pattern_folder), "--val-size",
            "0", "--epochs", "1", "--teacher", str(broken), "-q"]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert (
        code == 2
        and err == f"kdsearch: error: teacher {broken} holds NaN or infinite weights ({key}); it cannot teach\n"
    )


@pytest.mark.parametrize("command", ["train", "teacher"])
def test_no_output_inside_the_default_download_folder(
    command: str, tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --data-dir a torchvision dataset is read from KDSEARCH_DATA/<dataset>: an input folder too."""
    monkeypatch.setenv("KDSEARCH_DATA", str(tmp_path / "data"))
    downloaded = tmp_path / "data" / "cifar10"
    downloaded.mkdir(parents=True)  # a dataset downloaded earlier
    out = downloaded / "model.pt"
    args = [command, "--dataset", "cifar10", "--out", str(out), "--epochs", "1", "-q"]
    code, _, err = run_cli([*args, *(["--method", "ce"] if command == "train" else [])], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert (
        err
        == f"kdsearch: error: --out {out} is inside {downloaded}, a folder this command reads; "
        + err.split("a folder this command reads; ")[1]
    )
    assert list(downloaded.iterdir()) == []


def test_read_only_places_are_one_line_before_any_work(
    read_only_place: Path,
    search,
    home: Path,
    stub: StubTrainer,
    pattern_folder: Path,
    untrained_teacher: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ro = read_only_place
    said = "is a read-only file system"
    data = ["--dataset", "imagefolder", "--data-dir", str(pattern_folder), "--val-size", "0", "--epochs", "1", "-q"]
    assert search("--trials", "1")[0] == 0 and stub.runs  # a study to report on, in the writable home
    stub.runs.clear()
    cases = {
        "storage": lambda: search("--trials", "1", "--storage", f"sqlite:///{ro}/s.db"),
        "train --out": lambda: run_cli(["train", "--method", "ce", *data, "--out", str(ro / "s.pt")], capsys),
        "teacher --out": lambda: run_cli(["teacher", *data, "--out", str(ro / "t.pt")], capsys),
        "report -o": lambda: run_cli(["report", "--study-name", "kd-imagefolder", "-o", str(ro / "r.html")], capsys),
        "report --png": lambda: run_cli(
            ["report", "--study-name", "kd-imagefolder", "-o", str(home.parent / "r.html"), "--png", str(ro / "p")],
            capsys,
        ),
    }
    for case, run in cases.items():
        code, _, err = run()
        assert code == 2 and err.count("\n") == 1 and said in err, (case, err)
    assert not (home.parent / "r.html").exists()  # report --png failed before it wrote the HTML
    # A read-only KDSEARCH_HOME: the cache folder (its lock files too) is refused before decoding.
    monkeypatch.setenv("KDSEARCH_HOME", str(ro / "home"))  # a home that would be made there
    code, _, err = run_cli(["train", "--method", "ce", *data], capsys)
    assert code == 2 and err.startswith("kdsearch: error: the cache folder ") and said in err, err
    # A read-only working directory with the default home (studies/ there) and storage.
    monkeypatch.delenv("KDSEARCH_HOME")
    monkeypatch.chdir(ro)
    code, _, err = search("--trials", "1")
    assert (
        code == 2 and err.startswith("kdsearch: error: storage studies/kdsearch.db: cannot write in ") and said in err
    )
    assert stub.runs == []
