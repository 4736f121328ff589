"""Study storages: opening them, reading studies back, masking secrets.

Optuna's RDB storage (SQLite by default, PostgreSQL or MySQL by URL) holds studies and is the
distributed engine (best-student checkpoints are artifacts beside it: ``kdsearch.artifacts``).
Every URL that reaches output goes through ``redact`` first.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from kdsearch.errors import UserError, shown
from kdsearch.fsutil import check_writable
from kdsearch.paths import home_dir

# Attempts to open a storage whose tables another worker is creating at the same moment.
TABLE_RACE_RETRIES = 5
# Query parameters of a database URL that carry secrets (libpq, SQLAlchemy drivers).
SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "secret", "token", "sslpassword", "access_token", "api_key")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:" + "|".join(SECRET_QUERY_KEYS) + r")=)[^&#]*")
# The tables every Optuna RDB storage holds: a database without them holds no study, and reading
# it must not create them.
OPTUNA_TABLES = frozenset({"studies", "version_info"})
MASK = "***"


def default_storage_url() -> str:
    """``KDSEARCH_STORAGE`` if set, else a SQLite file under the studies home."""
    return os.environ.get("KDSEARCH_STORAGE") or f"sqlite:///{home_dir() / 'kdsearch.db'}"


def _userinfo_span(url: str) -> tuple[int, int] | None:
    """Where the password of ``url`` lies (start, end), or None when it has none.

    The password runs from the first ``:`` after ``scheme://user`` to the *last* ``@``: SQLAlchemy
    allows ``/``, ``?``, ``#`` and ``:`` in it, and a user who did not percent-encode an ``@`` has a
    password SQLAlchemy cuts short, its rest read as part of the host, which must not show either.
    Masking up to the last ``@`` may hide a little more than the password (an ``@`` in the query),
    never less.
    """
    scheme_end = url.find("://")
    if scheme_end < 0:
        return None
    start = scheme_end + 3
    at = url.rfind("@", start)
    if at < 0:
        return None
    colon = url.find(":", start, at)
    return (colon + 1, at) if colon >= 0 else None


def redact(url: str) -> str:
    """The URL with every credential masked (the password, and secret query parameters):
    what may appear in output, logs and exported files.

    It keeps the URL as the user wrote it otherwise (SQLAlchemy's ``render_as_string`` would
    reorder the query and, for an unencoded ``@``, show the password's tail as the host).
    """
    span = _userinfo_span(url)
    if span is not None:
        url = f"{url[: span[0]]}{MASK}{url[span[1] :]}"
    return _SECRET_QUERY.sub(rf"\1{MASK}", url)


def url_secrets(url: str) -> set[str]:
    """Every secret ``url`` holds, as written and percent-decoded, and as SQLAlchemy parses it."""
    from urllib.parse import parse_qsl, unquote

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    found: set[str] = set()
    span = _userinfo_span(url)
    if span is not None:
        # An unencoded ``@`` splits the password: SQLAlchemy sends the first piece as the password
        # and a driver's error names the rest as part of the host.
        found |= {url[span[0] : span[1]], *url[span[0] : span[1]].split("@")}
    _, _, query = url.partition("?")
    found |= {value for key, value in parse_qsl(query) if key.lower() in SECRET_QUERY_KEYS}
    found |= {match.group(0).split("=", 1)[1] for match in _SECRET_QUERY.finditer(url)}
    try:
        parsed = make_url(url)
        if parsed.password is not None:
            found.add(str(parsed.password))
        for key, value in parsed.query.items():
            if key.lower() in SECRET_QUERY_KEYS:
                found |= {value} if isinstance(value, str) else set(value)
    except (ArgumentError, ValueError, TypeError):
        pass
    found |= {unquote(secret) for secret in found}
    return {secret for secret in found if secret and secret != MASK}


def redact_text(text: str, url: str) -> str:
    """``text`` (a driver's error, say) with the URL and every secret of ``url`` masked wherever they occur.

    A driver may quote the URL, the decoded password or a query value anywhere in its message;
    replacing the secrets themselves masks them in every form the message can take.
    """
    text = text.replace(url, redact(url))
    for secret in sorted(url_secrets(url), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return _SECRET_QUERY.sub(rf"\1{MASK}", text)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def cannot_open(url: str, exc: BaseException) -> UserError:
    """The one line for a storage that cannot be opened: the driver's reason, every secret masked."""
    return UserError(f"cannot open storage {redact(url)}: {redact_text(_first_line(exc), url)}")


# Query parameters SQLAlchemy's SQLite dialect reads itself; any other is SQLite's, and only a URI passes it on.
SQLALCHEMY_SQLITE_QUERY = {
    *("timeout", "check_same_thread", "isolation_level", "uri", "detect_types", "cached_statements"),
}


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (None for other back-ends); a malformed URL is a user error."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
        parsed.port  # noqa: B018 - a non-numeric port raises here, not deep inside a connect
    except (ArgumentError, ValueError):
        raise UserError(
            f"malformed storage URL {redact(url)!r}; expected e.g. sqlite:///studies/kdsearch.db "
            "or postgresql+psycopg2://user@host/db"
        ) from None
    if parsed.get_backend_name() != "sqlite":
        return None
    database, query = parsed.database or "", dict(parsed.query)
    uri = str(query.get("uri", "")).lower() in ("true", "1")
    if not uri:
        sqlite_only = sorted(set(query) - SQLALCHEMY_SQLITE_QUERY)
        if database.startswith("file:") or sqlite_only:
            what = f"query {', '.join(sqlite_only)}" if sqlite_only else "a file: database"
            raise UserError(
                f"storage URL {redact(url)!r}: {what} takes effect only as a SQLite URI, with uri=true "
                "(sqlite:///file:PATH?mode=ro&uri=true); without it SQLAlchemy ignores it"
            )
    elif database.startswith("file:"):
        database = database.removeprefix("file:")
    if not database or database == ":memory:" or query.get("mode") == "memory":
        raise UserError("an in-memory SQLite storage would lose the study; give a file, e.g. sqlite:///study.db")
    return Path(database)


def is_read_only(url: str) -> bool:
    """A SQLite URI opened read-only (``mode=ro`` or ``immutable=1`` with ``uri=true``)."""
    from sqlalchemy.engine import make_url

    if sqlite_path(url) is None:
        return False
    query = dict(make_url(url).query)
    return query.get("mode") == "ro" or str(query.get("immutable", "")) in ("1", "true")


def refuse_read_only(url: str) -> None:
    """Commands that write (optimize, confirm) refuse a read-only SQLite URI, or a SQLite file whose folder
    cannot be written (SQLite writes its journal beside it), before they do any work."""
    if is_read_only(url):
        raise UserError(f"storage {redact(url)} is opened read-only (mode=ro): this command writes to it")
    path = sqlite_path(url)
    if path is not None:
        check_writable(path.absolute().parent, f"storage {path}")


def check_storage_url(url: str, *, create_parent: bool) -> Path | None:
    """Reject malformed URLs before anything connects or creates a file; returns a SQLite file's path."""
    path = sqlite_path(url)
    if path is None:
        return None
    if path.exists() and not path.is_file():
        raise UserError(f"storage {path} is not a file")
    if not path.parent.exists():
        if not create_parent:
            raise UserError(f"storage directory {path.parent} does not exist")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create storage directory {path.parent}: {exc.strerror or exc}") from None
    return path


def _sqlite_tables(path: Path) -> set[str]:
    """The tables of a SQLite file, read without writing (an empty or missing file has none)."""
    import sqlite3

    if not path.exists() or path.stat().st_size == 0:
        return set()
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
            return {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError:
        raise UserError(f"storage {path} is not a SQLite database") from None


def _refuse_foreign_sqlite(path: Path) -> None:
    """A SQLite file that holds other tables and none of Optuna's is somebody else's database."""
    tables = _sqlite_tables(path)
    if tables and "studies" not in tables:
        raise UserError(f"storage {path} is a SQLite database of something else, not an Optuna storage")


def _database_tables(url: str) -> set[str]:
    """The tables of a server database (PostgreSQL, MySQL), listed with SQLAlchemy's inspector alone.

    Optuna's ``RDBStorage`` creates its tables on opening; a reader looks first, so listing or
    serving a database of something else (or an empty one) never writes to it.
    """
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.exc import SQLAlchemyError

    try:
        engine = create_engine(url, pool_pre_ping=True)
        try:
            with engine.connect() as connection:
                return set(inspect(connection).get_table_names())
        finally:
            engine.dispose()
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise cannot_open(url, exc) from None


def open_storage(
    url: str, *, heartbeat: int | None = None, create_parent: bool = False, reading: bool = False
) -> optuna.storages.RDBStorage:
    """An RDB storage; SQLite waits for locks instead of failing, and dead workers' trials are retried.

    A read-only SQLite URI serves ``reading`` commands (studies, export, report) and is refused by the
    ones that write (optimize, confirm) in one line, before anything runs.
    """
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError, SQLAlchemyError

    sqlite_file = check_storage_url(url, create_parent=create_parent)
    if sqlite_file is not None:
        _refuse_foreign_sqlite(sqlite_file)
    if not reading:
        refuse_read_only(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if sqlite_file is not None:
        engine_kwargs = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        # Heartbeats are marked experimental in Optuna 5, yet they are its documented way to
        # recover trials of dead workers; the warning would print once per worker.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        heartbeat_kwargs: dict[str, Any] = {}
        if heartbeat is not None:
            heartbeat_kwargs = {
                "heartbeat_interval": heartbeat,
                "grace_period": 2 * heartbeat + 1,
                "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
            }
        for attempt in range(TABLE_RACE_RETRIES + 1):
            try:
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, skip_table_creation=reading, **heartbeat_kwargs
                )
            except (IntegrityError, ProgrammingError, OperationalError) as exc:
                # Workers started together on an empty database race to create Optuna's tables;
                # the losers see "duplicate key" / "already exists" and succeed on a retry.
                racing = any(word in str(exc) for word in ("already exists", "duplicate", "Duplicate"))
                if not racing or attempt == TABLE_RACE_RETRIES:
                    raise cannot_open(url, exc) from None
                time.sleep(0.5 * (attempt + 1))
            except (SQLAlchemyError, ImportError, ValueError) as exc:
                raise cannot_open(url, exc) from None
    raise AssertionError("unreachable")


def open_existing_storage(url: str | None) -> tuple[optuna.storages.BaseStorage | None, str]:
    """Open a storage for reading, or None when it holds no study yet; reading never writes.

    A SQLite file that does not exist is not created, and a database without Optuna's tables (an
    empty file, a PostgreSQL database of other tables) does not get them: Optuna would create both.
    """
    url = url or default_storage_url()
    sqlite_file = sqlite_path(url)
    if sqlite_file is not None:
        if not sqlite_file.exists():
            return None, url
        if sqlite_file.is_dir():
            raise UserError(f"storage {sqlite_file} is not a file")
        _refuse_foreign_sqlite(sqlite_file)
        tables = _sqlite_tables(sqlite_file)
    else:
        tables = _database_tables(url)
    if not OPTUNA_TABLES <= tables:
        return None, url
    return open_storage(url, reading=True), url


def no_studies_in(url: str) -> str:
    """What a reader says of a storage that holds no study (missing, empty, or of other tables)."""
    return f"no kdsearch studies in {redact(url)}"


def is_kdsearch_study(study: optuna.Study) -> bool:
    """Created by kdsearch: it records the method and objectives every kdsearch study records."""
    return "method" in study.user_attrs and "objectives" in study.user_attrs


def load_existing_study(storage_url: str | None, study_name: str) -> tuple[optuna.Study, str]:
    """A kdsearch study that exists; anything else (no storage, no study, a plain Optuna one) is a user error."""
    storage, url = open_existing_storage(storage_url)
    if storage is None:
        sqlite_file = sqlite_path(url)
        why = "the storage file does not exist yet" if sqlite_file and not sqlite_file.exists() else "it holds none"
        raise UserError(f"no study named {shown(study_name)} in {redact(url)}: {why}")
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        raise UserError(
            f"no study named {shown(study_name)} in {redact(url)}; studies there: {', '.join(names) or 'none'}"
        ) from None
    if not is_kdsearch_study(study):
        raise UserError(f"study {shown(study_name)} in {redact(url)} was not created by kdsearch")
    return study, url


def counts(study: optuna.Study) -> dict[str, int]:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return {
        "complete": states.count(TrialState.COMPLETE),
        "pruned": states.count(TrialState.PRUNED),
        "failed": states.count(TrialState.FAIL),
        "running": states.count(TrialState.RUNNING),
    }


def pareto_front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's Pareto-optimal trials in one order everywhere (summary, export, report): by the
    objectives after accuracy, so the smallest (fastest) student comes first."""
    return sorted(study.best_trials, key=lambda t: t.values[1:])
