"""Schemas, instances and tools shared by the structured-output tests.

Every schema's language is finite (strings bounded by maxLength or a pattern,
arrays by maxItems, numbers by bounds and multipleOf, no extra properties), so a
random-weight model, whose free output is garbage, must still close the JSON
within a few dozen tokens: only the mask makes it valid.
"""

from __future__ import annotations

_POINT = {
    "type": "object",
    "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9},
        "y": {"type": "integer", "minimum": -9, "maximum": 9},
    },
    "required": ["x", "y"],
    "additionalProperties": False,
}

# name -> (schema, a valid instance, an invalid instance of the same shape)
SCHEMAS: dict[str, tuple[dict, object, object]] = {
    "flat": (
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 8},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
            },
            "required": ["name", "age"],
            "additionalProperties": False,
        },
        {"name": "Ada", "age": 36},
        {"name": "Ada", "age": 121},
    ),
    "nested": (
        {
            "type": "object",
            "properties": {
                "user": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer", "minimum": 0, "maximum": 999},
                        "address": {
                            "type": "object",
                            "properties": {
                                "city": {"type": "string", "maxLength": 6},
                                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                            },
                            "required": ["city", "zip"],
                            "additionalProperties": False,
                        },
                    },
                    "required": ["id", "address"],
                    "additionalProperties": False,
                }
            },
            "required": ["user"],
            "additionalProperties": False,
        },
        {"user": {"id": 7, "address": {"city": "Paris", "zip": "75001"}}},
        {"user": {"id": 7, "address": {"city": "Paris"}}},
    ),
    "array": (
        {
            "type": "object",
            "properties": {
                "tags": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 5},
                    "minItems": 1,
                    "maxItems": 3,
                }
            },
            "required": ["tags"],
            "additionalProperties": False,
        },
        {"tags": ["mamba", "moe"]},
        {"tags": ["a", "b", "c", "d"]},
    ),
    "enum": (
        {
            "type": "object",
            "properties": {
                "sentiment": {"enum": ["positive", "negative", "neutral"]},
                "confidence": {"type": "string", "enum": ["low", "high"]},
            },
            "required": ["sentiment", "confidence"],
            "additionalProperties": False,
        },
        {"sentiment": "neutral", "confidence": "high"},
        {"sentiment": "happy", "confidence": "high"},
    ),
    "bounds": (
        {
            "type": "object",
            "properties": {
                "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                "temperature": {
                    "type": "number",
                    "minimum": -10,
                    "maximum": 40,
                    "multipleOf": 0.25,
                },
            },
            "required": ["rating", "temperature"],
            "additionalProperties": False,
        },
        # llguidance writes a multipleOf 0.25 with exactly two decimals (21.5 as 21.50)
        {"rating": 4, "temperature": 21.25},
        {"rating": 4, "temperature": 40.25},
    ),
    "optional": (
        {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 6},
                "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                "draft": {"type": "boolean"},
            },
            "required": ["title"],
            "additionalProperties": False,
        },
        {"title": "Notes", "draft": False},
        {"title": "Notes", "year": "2025"},
    ),
    "ref": (
        {
            "$defs": {"point": _POINT},
            "type": "object",
            "properties": {
                "start": {"$ref": "#/$defs/point"},
                "end": {"$ref": "#/$defs/point"},
            },
            "required": ["start", "end"],
            "additionalProperties": False,
        },
        {"start": {"x": 0, "y": 1}, "end": {"x": -2, "y": 3}},
        {"start": {"x": 0}, "end": {"x": -2, "y": 3}},
    ),
    "pattern": (
        {
            "type": "object",
            "properties": {
                "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                "code": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
            },
            "required": ["date", "code"],
            "additionalProperties": False,
        },
        {"date": "2025-10-02", "code": "IBM42"},
        {"date": "2025-10-02", "code": "ibm42"},
    ),
    "top_array": (
        {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 4},
        [1, 22, 3],
        [1, 2, 3, 4, 5],
    ),
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 10},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "set_alarm",
            "description": "Set an alarm.",
            "parameters": {
                "type": "object",
                "properties": {
                    "hour": {"type": "integer", "minimum": 0, "maximum": 23},
                    "minute": {"type": "integer", "minimum": 0, "maximum": 59},
                    "label": {"type": "string", "maxLength": 6},
                },
                "required": ["hour", "minute"],
                "additionalProperties": False,
            },
        },
    },
    {"type": "function", "function": {"name": "now", "description": "The current time."}},
]


def tool_parameters(name: str) -> dict:
    """The parameters schema a call of ``name`` must satisfy ({} for none)."""
    for tool in TOOLS:
        if tool["function"]["name"] == name:
            return tool["function"].get(
                "parameters", {"type": "object", "additionalProperties": False}
            )
    raise KeyError(name)
