"""Reading a user's texts from a file: JSON Lines or plain text, one example per line.

JSON Lines (any suffix but .txt): one object per line, either {"text": ...} or
{"prompt": ..., "completion": ...} (prompt optional), with an optional "id". Plain text
(.txt): one text per line. Blank lines are skipped; an example without an id is named by
its 1-based line number, so ids point back into the file. The items are what
`CausalLMTask.examples` takes: texts, or (prompt, completion) pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

from datafluence.tasks import LMItem


def read_texts(path: str | Path, role: str = "texts") -> tuple[list[LMItem], list[str]]:
    """(items, ids) of a JSONL or .txt file; clear errors name the file, the line and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the {role} file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    plain = path.suffix.lower() == ".txt"
    items: list[LMItem] = []
    ids: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        item, name = (line, None) if plain else _json_item(line, path, number)
        name = str(number) if name is None else name
        if name in first_line:
            raise ValueError(
                f"{path}:{number}: id {name!r} was already used on line {first_line[name]}; "
                "every example needs its own id"
            )
        first_line[name] = number
        items.append(item)
        ids.append(name)
    if not items:
        raise ValueError(
            f"the {role} file {path} holds no examples; write one JSON object per line "
            '({"text": ...} or {"prompt": ..., "completion": ...}), or one text per line in a '
            ".txt file"
        )
    return items, ids


def _json_item(line: str, path: Path, number: int) -> tuple[LMItem, str | None]:
    where = f"{path}:{number}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{where} is not valid JSON ({err.msg}); write one JSON object per line, or name "
            "the file *.txt for plain text, one example per line"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f'{where} is {type(obj).__name__}, not an object like {{"text": ...}}')
    if "text" in obj and "completion" in obj:
        raise ValueError(f'{where} has both "text" and "completion"; give one of them')
    if "completion" in obj:
        prompt, completion = obj.get("prompt", ""), obj["completion"]
        _check_strings(where, prompt=prompt, completion=completion)
        item: LMItem = (prompt, completion) if prompt else completion
    elif "text" in obj:
        if "prompt" in obj:
            raise ValueError(f'{where} has "prompt" with "text"; a prompt goes with "completion"')
        _check_strings(where, text=obj["text"])
        item = obj["text"]
    else:
        raise ValueError(
            f'{where} has no "text" or "completion" (keys: {sorted(obj)}); write '
            '{"text": ...} or {"prompt": ..., "completion": ...}'
        )
    name = obj.get("id")
    if name is not None and not isinstance(name, str | int):
        raise ValueError(f'{where}: "id" must be a string or an integer, got {name!r}')
    return item, None if name is None else str(name)


def _check_strings(where: str, **fields: object) -> None:
    for key, value in fields.items():
        if not isinstance(value, str):
            raise ValueError(f'{where}: "{key}" must be a string, got {value!r}')
        if key != "prompt" and not value.strip():
            raise ValueError(f'{where}: "{key}" is empty; every example needs text to predict')
