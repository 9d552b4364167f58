"""`posttrain data from-logs DIR`: request logs (`serve --log-dir`, `ui --log-dir`) -> prompt or SFT rows.

What InstructGPT did with its API logs (Ouyang et al. 2022, sec. 3.2): scrub personal data, drop
duplicate prompts, keep at most 200 prompts per user id, and keep the user id so that
`data split --by user_id` never puts one user's prompts in two splits. Steps, in log order
(oldest file first):
1. a line that is not a JSON object with `messages` (chat) or `prompt` (completions) is `malformed`;
2. PII (e-mail, phone, id numbers; curate.filter's scrubber) becomes <email>, <phone>, <id>;
3. no user turn -> `empty_prompt`; sft rows with an empty reply -> `empty_response`;
4. the same prompt (sft: prompt and reply) seen before, after lower-casing and collapsing
   spaces -> `duplicate`;
5. a user's rows past `per_user` -> `user_cap`. Requests without a user id share one id, `anonymous`.
User ids are written as `u-` + 16 hex digits of their SHA-256 unless `keep_user_ids`: the groups
stay apart without the raw ids (which may be e-mail addresses) reaching the data.
Every removed row goes to `<out>.removed.jsonl` with its reason; malformed lines are only located.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from posttrain.curate.dedup import exact_key
from posttrain.curate.filter import PiiScrubber
from posttrain.curate.stream import AtomicJsonl, side_path
from posttrain.errors import DataError

MODES = ("prompts", "sft")
ANONYMOUS = "anonymous"
MAX_LOCATIONS = 20  # malformed lines listed by place in the report; all are counted


def log_paths(folder: str | Path) -> list[Path]:
    """The folder's log files, oldest first: chat-000001.jsonl, ..., then chat.jsonl (see serve/chatlog.py)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (give the --log-dir of serve or ui)")
    rotated = sorted(folder.glob("chat-[0-9]*.jsonl"))
    current = [folder / "chat.jsonl"] if (folder / "chat.jsonl").is_file() else []
    if not rotated and not current:
        raise DataError(f"{folder}: no chat.jsonl or chat-NNNNNN.jsonl log files")
    return rotated + current


def _messages(record: dict) -> list[dict] | None:
    """The logged conversation as [{role, content}], or None when the record is not a log record."""
    if isinstance(record.get("messages"), list):
        msgs = record["messages"]
        if all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
               for m in msgs):
            return [{"role": m["role"], "content": m["content"]} for m in msgs]
        return None
    if isinstance(record.get("prompt"), str):
        return [{"role": "user", "content": record["prompt"]}]
    return None


def read_records(paths: list[Path], malformed: list[str]):
    """(source, record, messages) per usable line; the place of each unusable one is appended to `malformed`."""
    for path in paths:
        with path.open(encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                msgs = _messages(record) if isinstance(record, dict) else None
                responses = record.get("responses") if isinstance(record, dict) else None
                if msgs is None or not isinstance(responses, list):
                    malformed.append(f"{path} line {number}")
                    continue
                yield f"{path} line {number}", record, msgs


def user_id(raw, keep: bool) -> str:
    if not isinstance(raw, str) or not raw.strip():
        return ANONYMOUS
    return raw.strip() if keep else "u-" + hashlib.sha256(raw.strip().encode()).hexdigest()[:16]


def _row(record: dict, msgs: list[dict], mode: str, uid: str, n: int) -> tuple[dict | None, str | None]:
    """(output row, None) or (None, reason it is removed)."""
    while msgs and msgs[-1]["role"] == "assistant":  # a logged prompt ends with the user's turn
        msgs = msgs[:-1]
    if not any(m["role"] == "user" and m["content"].strip() for m in msgs):
        return None, "empty_prompt"
    row = {"id": f"log-{n}", "user_id": uid, "model": record.get("model"), "time": record.get("time")}
    if mode == "prompts":
        single = len(msgs) == 1 and msgs[0]["role"] == "user"
        return row | ({"prompt": msgs[0]["content"]} if single else {"messages": msgs}), None
    reply = record["responses"][0] if record["responses"] and isinstance(record["responses"][0], str) else ""
    if not reply.strip():
        return None, "empty_response"
    return row | {"messages": [*msgs, {"role": "assistant", "content": reply}]}, None


def _dedup_key(row: dict) -> int:
    msgs = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
    return exact_key(json.dumps([[m["role"], m["content"]] for m in msgs], ensure_ascii=False))


def from_logs(log_dir: str | Path, out: str | Path, *, mode: str = "prompts", per_user: int = 200,
              keep_user_ids: bool = False) -> dict:
    """Write prompt ({"prompt"} or {"messages"}) or SFT ({"messages"}) rows with user_id; report every count."""
    if mode not in MODES:
        raise DataError(f"--as must be one of {', '.join(MODES)}, got {mode!r}")
    if per_user < 1:
        raise DataError(f"--per-user must be >= 1, got {per_user}")
    paths = log_paths(log_dir)
    removed, malformed = Counter(), []
    seen: set[int] = set()
    per: Counter = Counter()
    records = scrubbed = 0
    scrub = PiiScrubber(("email", "phone", "id"))  # names need a list of names: data filter's `pii` rule has it
    with AtomicJsonl(out) as writer, AtomicJsonl(side_path(out, "removed")) as rejects:
        for n, (source, record, msgs) in enumerate(read_records(paths, malformed)):
            records += 1
            clean = scrub({"messages": msgs, "responses": record["responses"]})
            scrubbed += clean != {"messages": msgs, "responses": record["responses"]}
            uid = user_id(record.get("user"), keep_user_ids)
            row, reason = _row(record | {"responses": clean["responses"]}, clean["messages"], mode, uid, n)
            if row is not None:
                key = _dedup_key(row)
                reason = "duplicate" if key in seen else "user_cap" if per[uid] >= per_user else None
            if reason is not None:
                removed[reason] += 1
                rejects.write({"source": source, "reason": reason, "user_id": uid, "row": row or clean})
                continue
            seen.add(key)
            per[uid] += 1
            writer.write(row)
    return {"files": [str(p) for p in paths], "records": records, "malformed": len(malformed),
            "malformed_lines": malformed[:MAX_LOCATIONS], "kept": writer.count, "removed": dict(removed),
            "pii_scrubbed": scrubbed, "pii_matches": dict(scrub.counts),
            "users": len(per), "out": str(out), "removed_file": str(rejects.path)}
