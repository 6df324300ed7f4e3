"""Response formats as grammars: a job's `task.response_format` or an OpenAI request's, turned
into the llguidance grammar a row's output is kept to (engines/constraints.py applies it).

A leaf module, so the spec (one-line errors for a bad schema), the OpenAI reader (a 400 row
error) and the engines all reach it. llguidance is imported only when a format is given.
"""

from __future__ import annotations

import difflib
import functools
import json
from typing import Any

RESPONSE_TYPES = ("json_schema", "json_object", "regex", "choice")
# JSON as json.dumps writes it: a model may not fill its token limit with whitespace between
# fields (a schema's own "x-guidance" settings win)
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# before a special token's text in a token's bytes as engines/constraints.token_bytes_of gives
# them (the text leaves those tokens out): no UTF-8 text starts with this byte
SPECIAL_MARK = b"\xff"
# JSON Schema's keywords (drafts 4 to 2020-12): those whose value maps names to subschemas,
# those whose value is a subschema or a list of them, and the rest
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SCHEMA_VALUES = (
    *("allOf", "anyOf", "oneOf", "not", "if", "then", "else", "prefixItems", "items"),
    *("additionalItems", "contains", "additionalProperties", "propertyNames"),
    *("unevaluatedItems", "unevaluatedProperties", "contentSchema"),
)
SCHEMA_KEYWORDS = frozenset(
    (
        *SCHEMA_MAPS,
        *SCHEMA_VALUES,
        *("$schema", "$id", "$ref", "$anchor", "$dynamicRef", "$dynamicAnchor", "$comment"),
        *("$recursiveRef", "$recursiveAnchor", "$vocabulary", "dependencies", "type", "enum"),
        *("const", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum"),
        *("maxLength", "minLength", "pattern", "maxItems", "minItems", "uniqueItems"),
        *("maxContains", "minContains", "maxProperties", "minProperties", "required"),
        *("dependentRequired", "title", "description", "default", "deprecated", "readOnly"),
        *("writeOnly", "examples", "format", "contentEncoding", "contentMediaType"),
    )
)
# an unknown key is an annotation that constrains nothing, so one a letter or two from a
# keyword that constrains ("requried", "maxLenght") is taken for a misspelling; a near miss of
# an annotation keyword ("defaults", "readonly") constrains nothing either way, nor of a
# container of subschemas (a "$ref" may point into a "definition" as well)
DESCRIBING = frozenset(
    (
        *("$schema", "$id", "$anchor", "$dynamicAnchor", "$recursiveAnchor", "$vocabulary"),
        *("$defs", "definitions"),
        *("$comment", "title", "description", "default", "deprecated", "readOnly"),
        *("writeOnly", "examples", "contentEncoding", "contentMediaType", "contentSchema"),
    )
)
CONSTRAINING = sorted(SCHEMA_KEYWORDS - DESCRIBING)
# the annotations that schemas written for OpenAPI, pydantic and llguidance carry
ANNOTATIONS = frozenset(("example", "nullable", "discriminator", "strict", "name", "x-guidance"))


def llguidance_module():
    try:  # the core only: llguidance.torch compiles a kernel at import (1.4 s), unused here
        import llguidance
    except ImportError:
        raise ValueError(
            "structured output (response_format) needs the llguidance package: "
            "pip install llguidance"
        ) from None
    return llguidance


def grammar_for(response_format: Any) -> str | None:
    """The llguidance grammar of a `response_format` (a job's `task.response_format`, or an
    OpenAI request body's), or None for plain text. Raises ValueError naming the problem.

    Accepted: {"type": "text"}; {"type": "json_object"}; {"type": "json_schema", "json_schema":
    {"schema": {...}}} (OpenAI's shape) or {"type": "json_schema", "schema": {...}};
    {"type": "regex", "pattern": "..."}; {"type": "choice", "choices": ["a", "b"]}."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise ValueError("response_format must be an object with a `type`")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind not in RESPONSE_TYPES:
        raise ValueError(
            f"response_format.type {kind!r} is not one of text, {', '.join(RESPONSE_TYPES)}"
        )
    if kind == "json_object" and ("schema" in response_format or "json_schema" in response_format):
        raise ValueError(
            "response_format of type json_object takes no schema (any object is allowed); "
            "use type json_schema to keep rows to one"
        )
    ll = llguidance_module()
    if kind == "json_object":
        grammar = ll.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_LAYOUT)
    elif kind == "json_schema":
        schema = _schema_of(response_format)
        _refuse_misspelled(schema, "schema")
        grammar = ll.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
    elif kind == "regex":
        pattern = response_format.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("response_format.pattern must be a non-empty regular expression")
        grammar = ll.LLMatcher.grammar_from_regex(pattern)
        if not ll.LLMatcher.validate_grammar(grammar) and _matches_nothing(ll, pattern):
            raise ValueError(
                f"response_format.pattern {pattern!r} matches no text: every row would end "
                "at once, empty"
            )
    else:
        choices = response_format.get("choices")
        if (
            not isinstance(choices, list)
            or not choices
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise ValueError("response_format.choices must be a list of non-empty strings")
        options = " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
        grammar = ll.LLMatcher.grammar_from_lark(f"start: {options}")
    problem = ll.LLMatcher.validate_grammar(grammar)
    if problem:
        raise ValueError(f"response_format: {_one_line(problem)}")
    if _allows_no_text(ll, grammar):
        raise ValueError(
            "response_format: no text matches it (a $ref that only leads to itself, say): "
            "every row would end at once, empty"
        )
    return grammar


def _allows_no_text(ll, grammar: str) -> bool:
    """Whether a grammar llguidance accepts lets no text through: a matcher over single bytes
    fails at its first mask, or allows only the end where the empty text is no answer (a
    circular $ref compiles, and every row then ended at once, empty, marked ok)."""
    tokenizer = _byte_tokenizer(ll)
    found = ll.LLMatcher(tokenizer, grammar, log_level=0)
    bits = found.compute_bitmask()
    if found.is_error():
        return True
    allowed = {8 * i + b for i, byte in enumerate(bits) for b in range(8) if byte >> b & 1}
    return not found.is_accepting() and allowed <= {tokenizer.eos_token}


@functools.cache
def _byte_tokenizer(ll):
    return ll.LLTokenizer("byte")


def _matches_nothing(ll, pattern: str) -> bool:
    """Whether a regular expression matches no string at all (`[^\\s\\S]`): llguidance
    accepts such a grammar, and its matcher then allows only the end of the text. Its JSON
    schema compiler reports the empty language, so a string schema of the pattern asks it."""
    probe = ll.LLMatcher.grammar_from_json_schema({"type": "string", "pattern": pattern})
    return "Regex is empty" in ll.LLMatcher.validate_grammar(probe)


def _one_line(problem: str) -> str:
    """llguidance's error on one line: its first line, and the reason a regular expression
    failed to parse (a line `error: ...` below a picture of the pattern)."""
    lines = [line.strip() for line in problem.strip().splitlines()]
    reasons = [line for line in lines[1:] if line.startswith("error:")]
    first = lines[0].removesuffix("regex parse error:").rstrip().removesuffix("(in regex):")
    first = first.replace(
        "Enable 'coerce_one_of' option to approximate oneOf with anyOf",
        "use anyOf where any of the options may match",
    )
    return " ".join(part.strip() for part in [first, *reasons] if part.strip())


@functools.lru_cache(maxsize=256)
def grammar_of_json(response_format: str) -> str | None:
    """`grammar_for` of a response_format as JSON text (OpenAI requests carry theirs per row;
    a file of a million requests usually repeats a few)."""
    return grammar_for(json.loads(response_format))


def _schema_of(response_format: dict) -> dict:
    """The schema of a json_schema format: OpenAI's json_schema.schema, or schema beside it."""
    inner = response_format.get("json_schema")
    schema = inner.get("schema") if isinstance(inner, dict) else None
    if schema is None:
        schema = response_format.get("schema")
    if not isinstance(schema, dict):
        raise ValueError(
            "response_format of type json_schema needs a schema object "
            "(json_schema.schema, or schema)"
        )
    return schema


def _refuse_misspelled(schema: Any, where: str) -> None:
    """Raise ValueError for a key of this schema or its subschemas that is no keyword but
    close to one: the constraint it meant would be passed over (JSON Schema reads an unknown
    key as an annotation), and every row would be kept to a looser schema without a word."""
    if not isinstance(schema, dict):
        return
    for key, value in schema.items():
        if key in SCHEMA_KEYWORDS or key in ANNOTATIONS or not isinstance(key, str):
            pass
        elif meant := _misspelt(key):
            raise ValueError(
                f"response_format: {where} has {key!r}, no JSON Schema keyword (did you mean "
                f"{meant[0]!r}?): as it is, it would constrain nothing"
            )
        if key in SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                _refuse_misspelled(sub, f"{where}.{key}.{name}")
        elif key in SCHEMA_VALUES:
            for i, sub in enumerate(value if isinstance(value, list) else [value]):
                _refuse_misspelled(
                    sub, f"{where}.{key}" + (f"[{i}]" if isinstance(value, list) else "")
                )


def _misspelt(key: str) -> list[str]:
    """The keyword that constrains which `key` misspells: the same but for case ("Format",
    "anyof"), or a long one a letter or two off ("requried", "maxLenght"); short words near
    short keywords ("note", "cost", "form", "item") are words, not misspellings."""
    same = [k for k in CONSTRAINING if k.lower() == key.lower()]
    if same or len(key) < 6:
        return same
    longer = [k for k in CONSTRAINING if len(k) >= 6]
    return difflib.get_close_matches(key, longer, n=1, cutoff=0.84)


def breaks_schema(grammar: str, text: str) -> bool:
    """Whether a JSON text its grammar completed still breaks its schema where llguidance
    lets it through: a key repeated in an object open to other keys, or (with the jsonschema
    package) any other rule, such as an exclusive bound on a narrow number range. False for
    grammars that are not JSON schemas."""
    schema = _json_schema_of(grammar)
    if schema is None:
        return False
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except ValueError:  # a repeated key, or (never after a completed grammar) not JSON
        return True
    validator = _validator_of(grammar)
    return validator is not None and not validator.is_valid(value)


@functools.lru_cache(maxsize=256)
def _validator_of(grammar: str):
    """A jsonschema validator of the grammar's schema; None without the package, or for a
    schema llguidance reads and jsonschema does not."""
    try:
        import jsonschema
    except ImportError:
        return None
    schema = _json_schema_of(grammar)
    try:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError:
        return None
    return cls(schema)


@functools.lru_cache(maxsize=256)
def _json_schema_of(grammar: str) -> dict | None:
    try:
        parts = json.loads(grammar).get("grammars") or []
    except (ValueError, AttributeError):
        return None
    schema = parts[0].get("json_schema") if len(parts) == 1 else None
    if not isinstance(schema, dict):
        return None
    return {k: v for k, v in schema.items() if k != "x-guidance"}


def _unique_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        raise ValueError("a key repeated")
    return dict(pairs)
