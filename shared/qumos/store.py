"""A provider's data directory: the only place a provider keeps anything.

    DATA_DIR/
      provider.json              {"format": "qumos-provider", "name": "provider-b"}
      fragments/<fragment_id>.json   FragmentFile (see qumos.artifact), one per deployment
      access.jsonl               one JSON line per executed batch: what an insider sees

Fragment writes are atomic (temp file + fsync + rename), so a crash mid-deploy leaves a
fragment either whole or absent. The access log is append-only JSON lines; a torn last
line (crash mid-append) is skipped when reading. The attacker reads such a directory to
simulate a breach (`ProviderStore.open_existing`), which refuses anything else.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from pydantic import ValidationError
from qumos.artifact import FragmentFile
from qumos.errors import StoreError
from qumos.files import atomic_write
from qumos.spec import FRAGMENT_ID_RE
from qumos.wire import dump_json

MARKER = "provider.json"
MARKER_FORMAT = "qumos-provider"
_LOG_LOCK = threading.Lock()
_ID_RE = FRAGMENT_ID_RE  # the providers' rule; model names follow it (qumos.spec.NAME_RE)


class ProviderStore:
    def __init__(self, root: Path | str, name: str):
        self.root = Path(root)
        self.name = name
        self.fragments_dir = self.root / "fragments"
        self.log_path = self.root / "access.jsonl"

    # ----- opening ---------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path | str, name: str) -> ProviderStore:
        """Open (and initialise if empty) the data directory of provider `name`."""
        root = Path(root)
        marker = root / MARKER
        if marker.exists():
            store = cls.open_existing(root)
            if store.name != name:
                raise StoreError(f"{root}: holds the data of {store.name!r}, not {name!r}")
            return store
        root.mkdir(parents=True, exist_ok=True)
        atomic_write(marker, json.dumps({"format": MARKER_FORMAT, "name": name}).encode())
        return cls(root, name)

    @classmethod
    def open_existing(cls, root: Path | str) -> ProviderStore:
        """Open a directory that must already hold a provider's data."""
        root = Path(root)
        marker = root / MARKER
        if not root.is_dir():
            raise StoreError(f"{root}: no such directory")
        if not marker.is_file():
            raise StoreError(f"{root}: not a provider's data directory (no {MARKER})")
        try:
            meta = json.loads(marker.read_text())
        except (json.JSONDecodeError, OSError) as e:
            raise StoreError(f"{marker}: unreadable ({e})") from None
        if meta.get("format") != MARKER_FORMAT or not meta.get("name"):
            raise StoreError(f"{marker}: not a QuMoS provider marker")
        return cls(root, meta["name"])

    # ----- fragments ---------------------------------------------------------------------
    def _path(self, fragment_id: str) -> Path:
        if not _ID_RE.fullmatch(fragment_id):
            raise StoreError(f"fragment id {fragment_id!r}: use letters, digits, '_', '.', '-'")
        return self.fragments_dir / f"{fragment_id}.json"

    def put(self, ff: FragmentFile) -> Path:
        path = self._path(ff.fragment_id)
        atomic_write(path, ff.model_dump_json(indent=1).encode())
        return path

    def get(self, fragment_id: str) -> FragmentFile | None:
        path = self._path(fragment_id)
        if not path.is_file():
            return None
        return FragmentFile.model_validate_json(path.read_bytes())

    def delete(self, fragment_id: str) -> bool:
        path = self._path(fragment_id)
        if path.is_file():
            path.unlink()
            return True
        return False

    def load_all(self) -> tuple[dict[str, FragmentFile], list[str]]:
        """Every stored fragment, and the problems with files that could not be read."""
        out: dict[str, FragmentFile] = {}
        problems: list[str] = []
        if not self.fragments_dir.is_dir():
            return out, problems
        for p in sorted(self.fragments_dir.glob("*.json")):
            try:
                ff = FragmentFile.model_validate_json(p.read_bytes())
                out[ff.fragment_id] = ff
            except (ValidationError, OSError, ValueError) as e:
                problems.append(f"{p.name}: {str(e).splitlines()[0]}")
        return out, problems

    # ----- access log ----------------------------------------------------------------------
    def append_log(self, entry: dict) -> None:
        entry = {"time": time.time(), **entry}
        line = dump_json(entry) + b"\n"
        with _LOG_LOCK:  # one appender at a time, so a failed line can be cut off again
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                start = os.fstat(fd).st_size
                view = memoryview(line)
                try:
                    while view:  # a full disk gives a short write first, then ENOSPC
                        view = view[os.write(fd, view) :]
                except OSError:
                    try:
                        os.ftruncate(fd, start)  # no torn line left behind
                    except OSError:
                        pass
                    raise
            finally:
                os.close(fd)

    def read_log(self) -> list[dict]:
        if not self.log_path.is_file():
            return []
        entries = []
        for line in self.log_path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn line from a crash mid-append
        return entries
