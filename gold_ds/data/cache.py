"""The encoded-dataset cache: a source is encoded once (per node) and memory-mapped everywhere.

``encode_cached`` (called by one rank per node: ``gold_ds.trainer.build``) finds or writes
``<data.cache_dir>/<split>-<key>/``: ``table/`` (the kept rows, ``datasets.Dataset.save_to_disk``:
the student's int32 prompt and completion ids beside the raw columns later stages read) and
``gold_ds_cache.json`` (the encoding's report; written last). ``open_cached`` opens it memory-mapped
(every rank).

The key is a digest of everything that changes an encoding:
- the source: a builtin task's name, split, size and seed; local files' paths, sizes and
  modification times; a hub dataset's id, config name, split, revision and the fingerprint
  ``datasets`` gives what it loaded; the column mapping and ``num_examples``;
- the student's side (``fingerprint()``: tokenizer pipeline, special tokens, chat template; a
  vision-language processor's configuration), the two length limits;
- the source code of the encoding (this package's dataset, rendering and task modules).
The teacher's tokenizer is not part of it: teacher inputs are rendered per micro-step.

Writing is atomic: a cache is written into ``<name>.partial-<host>-<pid>`` and renamed into place
once complete, its report last, so a killed encoder never leaves a directory that passes for a
cache; its partial directory is removed by the next encoder on that host (a directory without its
report is rebuilt). Two nodes sharing a filesystem may both encode; the first rename wins and the
other uses it.
"""
import hashlib
import json
import os
import shutil
import socket
import time

from .dataset import BadRowError, EncodedDataset, encode_table, open_source, source_files

MARKER = "gold_ds_cache.json"
_CODE = ("dataset.py", "render.py", "vlm.py", "cache.py", "builtin.py", "tasks.py", "vlm_tasks.py")


def _code_digest() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for name in _CODE:
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def cache_key(side, source, raw, max_prompt_length: int, max_completion_length: int, where: str) -> dict:
    """What the cache key digests (``raw``: the loaded source for a hub dataset, else None)."""
    src = {"builtin": source.builtin, "split": source.split, "num_examples": source.num_examples,
           "seed": source.seed, "columns": source.columns}
    if source.builtin is None:
        files = source_files(source, where)
        src.update(name=source.name, revision=source.revision)
        if files is not None:  # however the path is written (relative, a glob), the same files are the same key
            src["files"] = [[os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]
        else:
            src.update(path=source.path, datasets_fingerprint=raw._fingerprint)
    return {"source": src, "side": side.fingerprint(), "max_prompt_length": max_prompt_length,
            "max_completion_length": max_completion_length, "code": _code_digest()}


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(root: str, name: str, log) -> None:
    """Remove this host's partial directories of ``name`` whose writer is gone, and ``name`` itself
    when it has no report (not written by ``encode_cached``)."""
    host = socket.gethostname()
    for entry in os.listdir(root):
        if entry.startswith(f"{name}.partial-{host}-"):
            pid = entry.rsplit("-", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                log(f"[gold_ds] removing {os.path.join(root, entry)}: left half written by an interrupted encoder")
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
    final = os.path.join(root, name)
    if os.path.isdir(final) and not os.path.isfile(os.path.join(final, MARKER)):
        log(f"[gold_ds] removing {final}: an incomplete cache (no {MARKER}); encoding again")
        shutil.rmtree(final, ignore_errors=True)


def encode_cached(side, source, data_cfg, cache_root: str, split: str, where: str, log=print) -> dict:
    """Find or write the cache of ``source`` encoded with ``side``; returns ``{"path", "hit",
    "seconds"}``. Called by one rank per node (the others wait for it, then ``open_cached``)."""
    t0 = time.perf_counter()
    raw = None
    if source.builtin is None and source_files(source, where) is None:
        raw = open_source(source, where)  # a hub dataset: its own cache keeps this cheap
    key = cache_key(side, source, raw, data_cfg.max_prompt_length, data_cfg.max_completion_length, where)
    name = f"{split}-{_digest(key)}"
    final = os.path.join(cache_root, name)
    os.makedirs(cache_root, exist_ok=True)
    _remove_stale(cache_root, name, log)
    if os.path.isfile(os.path.join(final, MARKER)):
        return {"path": final, "hit": True, "seconds": time.perf_counter() - t0}
    if raw is None:
        raw = open_source(source, where)
    partial = os.path.join(cache_root, f"{name}.partial-{socket.gethostname()}-{os.getpid()}")
    work = os.path.join(partial, "work")
    os.makedirs(work)
    try:
        try:
            table, info = encode_table(side, raw, data_cfg.max_prompt_length, data_cfg.max_completion_length,
                                       data_cfg.num_proc, work_dir=work, desc=f"[gold_ds] encoding {where}")
        except BadRowError as e:  # a row of no known format: name the source
            raise BadRowError(f"{where}: {e}") from None
        if len(table) == 0:  # nothing to cache (an empty table cannot be memory-mapped): say why
            EncodedDataset(table, info, side, where).check(data_cfg.on_bad_row)
        table.save_to_disk(os.path.join(partial, "table"))
        del table
        shutil.rmtree(work)
        with open(os.path.join(partial, MARKER), "w") as f:
            json.dump({"info": info, "key": key}, f, indent=1)
        try:
            os.rename(partial, final)
        except OSError:  # another node on a shared filesystem finished first
            if not os.path.isfile(os.path.join(final, MARKER)):
                raise
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"path": final, "hit": False, "seconds": time.perf_counter() - t0}


def open_cached(path: str, side, where: str) -> EncodedDataset:
    """The cache at ``path``, memory-mapped."""
    import datasets
    with open(os.path.join(path, MARKER)) as f:
        info = json.load(f)["info"]
    return EncodedDataset(datasets.load_from_disk(os.path.join(path, "table")), info, side, where)
