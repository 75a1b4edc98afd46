"""Tool calling on the chat route, pure: the request's tool plan and its checks, the prompt (the model's
template, or our fallback instruction), the JSON Schema that constrains `required` / named calls, and the
incremental parser that turns generated text into OpenAI tool calls.

Choices, in one place:
- `tool_choice: "none"` renders no tools and parses nothing (TGI's choice); `auto` (the default when tools are
  given) renders every tool and parses the output; `required` and a named function render the tools (a named
  one alone, as TGI does) and constrain the output with `call_schema`: one call object, or with
  `parallel_tool_calls` (OpenAI's default: true) and `required` a JSON array of 1 to `MAX_PARALLEL_CALLS`;
  a constrained call carries only the declared parameters (`additionalProperties: false` where the schema
  leaves it open), so every constrained call validates against its function's parameters.
- A chat template whose text mentions `tools` gets the tools, the assistant's earlier `tool_calls` (arguments
  as a mapping) and `role: "tool"` messages as they are. Any other template (SmolLM2's) gets
  `FALLBACK_TOOLS_PROMPT` as the system message (appended to the caller's), earlier calls as `<tool_call>`
  blocks in the assistant's text, and tool results as one user message of `<tool_response>` blocks.
- The parser accepts Hermes/Qwen `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks anywhere in
  the text, and bare call objects (or an array of them) at the start of the output or right after a call.
  `parameters` is read as `arguments` (Llama 3.1's key). A call must name a given tool; anything else stays
  content. With calls, `content` is the text outside them, stripped, or null when that is empty.
- `arguments` is the JSON text of the arguments as the model wrote it (streamed as it is generated); a string
  value holding JSON is unquoted; a call without arguments gets `{}`.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from llm_serving.errors import ToolError
from llm_serving.protocol.openai import ChatMessage, NamedToolChoice, Tool

MAX_TOOLS = 128
"""OpenAI's bound on `tools`."""
MAX_TOOLS_CHARS = 131_072
"""Bound on the JSON text of the tools rendered into the prompt."""
MAX_PARALLEL_CALLS = 8
"""Most calls a constrained `required` answer with `parallel_tool_calls` may hold."""
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""OpenAI's rule for a function name."""
CALL_ID_PREFIX = "call_"
CALL_ID_LENGTH = 24
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"
ARGUMENT_KEYS = ("arguments", "parameters")
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

FALLBACK_TOOLS_PROMPT = (
    "You may call one or more functions to answer. These are the functions, with their parameters as "
    "JSON Schema:\n<tools>\n{tools}\n</tools>\n"
    "For each call, answer with a JSON object holding the function's name and its arguments, inside "
    "<tool_call></tool_call> tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <arguments-json-object>}}\n</tool_call>'
)
"""The system instruction added when the chat template does not render tools (one JSON line per tool)."""

Mode = Literal["auto", "required", "named"]


def new_call_id() -> str:
    """`call_` + 24 random letters and digits, as OpenAI's ids look."""
    alphabet = string.ascii_letters + string.digits
    return CALL_ID_PREFIX + "".join(secrets.choice(alphabet) for _ in range(CALL_ID_LENGTH))


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request's tools do: the tools to render, which names a call may use, how calls are made."""

    mode: Mode
    tools: tuple[dict[str, Any], ...]
    """OpenAI-shaped tools (`{"type": "function", "function": {...}}`) to render."""
    parallel: bool

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t["function"]["name"] for t in self.tools)

    @property
    def constrained(self) -> bool:
        return self.mode != "auto"

    def schema(self) -> dict[str, Any] | None:
        """The JSON Schema every answer must follow (`required`, named), or None (`auto`)."""
        if not self.constrained:
            return None
        return call_schema(self.tools, many=self.parallel and self.mode == "required")


def _parameters(tool: Tool) -> dict[str, Any]:
    params = tool.function.parameters
    return NO_PARAMETERS if params is None else params


def _as_dict(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.function.name}
    if tool.function.description is not None:
        function["description"] = tool.function.description
    function["parameters"] = _parameters(tool)
    return {"type": "function", "function": function}


def _check_tools(tools: Sequence[Tool]) -> None:
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"`tools` supports up to {MAX_TOOLS} tools. Given: {len(tools)}")
    seen: set[str] = set()
    for tool in tools:
        name = tool.function.name
        if not TOOL_NAME.fullmatch(name):
            raise ToolError(f"Tool name `{name[:80]}` must be 1 to 64 letters, digits, underscores or dashes")
        if name in seen:
            raise ToolError(f"Tool name `{name}` is given more than once")
        seen.add(name)
        params = tool.function.parameters
        if params is not None and params.get("type", "object") != "object":
            raise ToolError(f"The parameters of tool `{name}` must be a JSON Schema of type `object`")


def plan_tools(
    tools: Sequence[Tool] | None,
    tool_choice: str | NamedToolChoice | None,
    parallel_tool_calls: bool | None,
) -> ToolPlan | None:
    """Check the request's tools and choice; None when no tool is rendered or parsed. Raises `ToolError`."""
    tools = tools or ()
    _check_tools(tools)
    choice = tool_choice or "auto"
    if not tools:
        if choice in ("auto", "none"):
            return None
        raise ToolError("`tool_choice` needs `tools`")
    if choice == "none":
        return None
    rendered = [_as_dict(t) for t in tools]
    size = len(json.dumps(rendered))
    if size > MAX_TOOLS_CHARS:
        raise ToolError(f"`tools` must be at most {MAX_TOOLS_CHARS} characters as JSON. Given: {size}")
    parallel = True if parallel_tool_calls is None else parallel_tool_calls
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        named = [t for t in rendered if t["function"]["name"] == name]
        if not named:
            raise ToolError(f"Tool with name {name} not found")
        return ToolPlan(mode="named", tools=tuple(named), parallel=False)
    mode: Mode = "required" if choice == "required" else "auto"
    return ToolPlan(mode=mode, tools=tuple(rendered), parallel=parallel)


def _hoisted(parameters: dict[str, Any], prefix: str, defs: dict[str, Any]) -> dict[str, Any]:
    """`parameters` with its local `$defs` / `definitions` moved into `defs` under `prefix`, refs rewritten:
    the schema is nested in the call schema, where `#/$defs/...` resolves against the new root."""
    local = {**parameters.get("definitions", {}), **parameters.get("$defs", {})}
    renames = {
        f"#/{section}/{key}": f"#/$defs/{prefix}{key}"
        for section in ("$defs", "definitions")
        for key in parameters.get(section, {})
    }

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: renames.get(v, v) if k == "$ref" and isinstance(v, str) else rewrite(v)
                for k, v in node.items()
                if k not in ("$defs", "definitions") or node is not parameters
            }
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for key, value in local.items():
        defs[f"{prefix}{key}"] = rewrite(value)
    result: dict[str, Any] = rewrite(parameters)
    return result


OPEN_ENDED_KEYS = (
    "additionalProperties",
    "unevaluatedProperties",
    "patternProperties",
    "allOf",
    "anyOf",
    "oneOf",
    "$ref",
)


def _closed(arguments: dict[str, Any]) -> dict[str, Any]:
    """A constrained call carries only the declared parameters (as OpenAI's `strict` does): an object schema
    with `properties` that says nothing about other keys gets `additionalProperties: false`."""
    if "properties" in arguments and not any(k in arguments for k in OPEN_ENDED_KEYS):
        return {**arguments, "additionalProperties": False}
    return arguments


def call_schema(tools: Sequence[dict[str, Any]], *, many: bool) -> dict[str, Any]:
    """The JSON Schema of one call `{"name": <a tool>, "arguments": <its parameters>}` (or, `many`, of an
    array of 1 to `MAX_PARALLEL_CALLS` calls). Every answer it accepts validates against the parameters."""
    defs: dict[str, Any] = {}
    calls = []
    for index, tool in enumerate(tools):
        function = tool["function"]
        arguments = _closed(_hoisted(function.get("parameters", NO_PARAMETERS), f"t{index}_", defs))
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": function["name"]}, "arguments": arguments},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    one = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = (
        {"type": "array", "items": one, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS} if many else dict(one)
    )
    if defs:
        schema["$defs"] = defs
    return schema


# --- rendering -----------------------------------------------------------------------------------------


def template_source(tokenizer: Any) -> str:
    """The tokenizer's chat template text (all named templates joined), or ""."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(str(v) for v in template.values())
    return template or ""


def renders_tools(template: str) -> bool:
    """Whether a chat template renders `tools` (and so, by convention, tool calls and tool results)."""
    return "tools" in template


def fallback_instruction(tools: Sequence[dict[str, Any]]) -> str:
    """`FALLBACK_TOOLS_PROMPT` filled with the tools, one JSON line each."""
    return FALLBACK_TOOLS_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))


def _arguments_value(arguments: str | dict[str, Any]) -> Any:
    """A call's arguments as templates expect them: a mapping when the string is a JSON object."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments


def _call_text(name: str, arguments: str | dict[str, Any]) -> str:
    body = json.dumps({"name": name, "arguments": _arguments_value(arguments)})
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def _native(message: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {
                    "name": call.function.name,
                    "arguments": _arguments_value(call.function.arguments),
                },
            }
            for call in message.tool_calls
        ]
    return out


def _fallback(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages for a template that knows no tools: calls become `<tool_call>` blocks in the assistant's
    text; tool results become a user message of `<tool_response>` blocks (consecutive ones merged)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "tool":
            block = f"{TOOL_RESPONSE_OPEN}\n{message.text()}\n{TOOL_RESPONSE_CLOSE}"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool_results": True})
            continue
        text = message.text()
        if message.tool_calls:
            calls = [_call_text(c.function.name, c.function.arguments) for c in message.tool_calls]
            text = "\n".join([text, *calls] if text else calls)
        out.append({"role": message.role, "content": text})
    for item in out:
        item.pop("tool_results", None)
    return out


def template_messages(
    messages: Sequence[ChatMessage], plan: ToolPlan | None, native: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and `tools` to hand `apply_chat_template`: as they are when the template renders tools
    (`native`), else in the fallback rendering with the tools as a system instruction."""
    if native:
        return [_native(m) for m in messages], None if plan is None else list(plan.tools)
    out = _fallback(messages)
    if plan is not None:
        instruction = fallback_instruction(plan.tools)
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{instruction}"
        else:
            out.insert(0, {"role": "system", "content": instruction})
    return out, None


def render_chat(tokenizer: Any, messages: Sequence[ChatMessage], plan: ToolPlan | None) -> str:
    """The chat prompt: the tokenizer's template over the messages, with the tools rendered. Raises what the
    template raises."""
    needs_tools = plan is not None or any(m.tool_calls or m.role == "tool" for m in messages)
    native = needs_tools and renders_tools(template_source(tokenizer))
    items, tools = template_messages(messages, plan, native or not needs_tools)
    kwargs: dict[str, Any] = {"tools": tools} if tools is not None else {}
    return str(tokenizer.apply_chat_template(items, tokenize=False, add_generation_prompt=True, **kwargs))


# --- parsing -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    text: str


ToolEvent = ContentDelta | CallStart | ArgumentsDelta


class _CallScanner:
    """Follows one JSON object char by char (from its `{`): the `name` string once complete, the raw text
    of the `arguments` / `parameters` value as it grows, whether a key other than those appeared (`foreign`),
    and when the object closes. Malformed text only makes it track nesting until the close."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.phase = "key"  # at depth 1: key, in_key, colon, value, in_value, comma
        self.key = ""
        self.raw: list[str] = []
        self.name: str | None = None
        self.args: list[str] = []
        self.args_seen = False
        self.args_done = False
        self.foreign = False
        self.broken = False
        self.closed = False

    def _string_char(self, c: str) -> bool:
        """Track string state for `c`; True while `c` is inside (or closes) a string."""
        if self.in_string:
            if self.escape:
                self.escape = False
            elif c == "\\":
                self.escape = True
            elif c == '"':
                self.in_string = False
            return True
        if c == '"':
            self.in_string = True
            return True
        return False

    def _collect(self, c: str) -> None:
        if self.key in ARGUMENT_KEYS and not self.args_done:
            self.args.append(c)
        elif self.key == "name":
            self.raw.append(c)

    def _end_value(self) -> None:
        if self.key == "name":
            try:
                value = json.loads("".join(self.raw))
            except ValueError:
                value = None
            if isinstance(value, str):
                self.name = value
            else:
                self.foreign = True
        elif self.key in ARGUMENT_KEYS and not self.args_done:
            self.args_done = True
            text = "".join(self.args)
            if text.startswith('"'):  # a JSON string holding the arguments' JSON
                try:
                    self.args = [str(json.loads(text))]
                except ValueError:
                    self.foreign = True
        self.raw = []
        self.phase = "comma"

    def feed(self, c: str) -> None:
        if self.depth == 0:
            self.depth = 1
            return
        if self.broken or self.phase not in ("in_value", "in_key"):
            self._structure(c)
            return
        if self.phase == "in_key":
            if self.escape or c == "\\" or c != '"':
                self.escape = not self.escape and c == "\\"
                self.raw.append(c)
                return
            try:
                self.key = str(json.loads('"' + "".join(self.raw) + '"'))
            except ValueError:
                self.key = ""
            if self.key not in ("name", *ARGUMENT_KEYS) or (self.key in ARGUMENT_KEYS and self.args_seen):
                self.foreign = True
            self.args_seen = self.args_seen or self.key in ARGUMENT_KEYS
            self.raw = []
            self.phase = "colon"
            return
        self._value_char(c)

    def _value_char(self, c: str) -> None:
        nested = self.depth > 1
        if self._string_char(c):
            self._collect(c)
            if not self.in_string and not nested:
                self._end_value()
            return
        if c in "{[":
            self.depth += 1
            self._collect(c)
        elif c in "}]":
            self.depth -= 1
            if self.depth == 0:  # a scalar value ends at the object's close
                self._end_value()
                self.closed = True
                return
            self._collect(c)
            if self.depth == 1:
                self._end_value()
        elif not nested and (c == "," or c.isspace()):
            self._end_value()
            self._structure(c)
        else:
            self._collect(c)

    def _structure(self, c: str) -> None:
        """A char outside any value: keys, colons, commas, the close (or anything, once broken)."""
        if self.broken:
            if not self._string_char(c):
                if c in "{[":
                    self.depth += 1
                elif c in "}]":
                    self.depth -= 1
                    self.closed = self.depth == 0
            return
        if c.isspace():
            return
        if self.phase in ("key", "comma") and c == "}":
            self.depth = 0
            self.closed = True
        elif self.phase == "key" and c == '"':
            self.phase = "in_key"
        elif self.phase == "comma" and c == ",":
            self.phase = "key"
        elif self.phase == "colon" and c == ":":
            self.phase = "value"
        elif self.phase == "value":
            self.phase = "in_value"
            self._value_char(c)
        else:
            self.broken = True
            self.foreign = True
            self._structure(c)


@dataclass
class _Call:
    scanner: _CallScanner = field(default_factory=_CallScanner)
    index: int | None = None
    """Set once the call is confirmed (its name is a given tool)."""
    sent: int = 0
    """Pieces of the scanner's `args` already emitted."""


class ToolCallParser:
    """Incremental: `feed` generated text, get `ToolEvent`s; text that may still become a call is held back
    (a `<tool_call>` prefix, or a call whose name has not been generated yet). `finish` releases the rest."""

    def __init__(self, names: frozenset[str], new_id: Callable[[], str] = new_call_id) -> None:
        self._names = names
        self._new_id = new_id
        self._events: list[ToolEvent] = []
        self._held: list[str] = []
        self._state = "text"  # text, tag, call, after_tag, array, array_sep
        self._boundary = True
        """At the start or right after a call: whitespace is held, `{` / `[` may open a bare call."""
        self._calls = 0
        self._call: _Call | None = None
        self._in_tag = False
        self._in_array = False

    # emission
    def _content(self, text: str) -> None:
        if not text:
            return
        if self._events and isinstance(self._events[-1], ContentDelta):
            self._events[-1] = ContentDelta(self._events[-1].text + text)
        else:
            self._events.append(ContentDelta(text))

    def _release(self) -> None:
        """Everything held is content after all."""
        self._content("".join(self._held))
        self._held = []

    def _revert(self, c: str | None) -> None:
        """The held candidate is not a call: release it, go back to text, and reread `c` there."""
        self._release()
        self._state, self._boundary, self._call = "text", False, None
        self._in_tag = self._in_array = False
        if c is not None:
            self._text_char(c)

    # states
    def feed(self, text: str) -> list[ToolEvent]:
        for c in text:
            getattr(self, f"_{self._state}_char")(c)
        return self._take()

    def _take(self) -> list[ToolEvent]:
        events, self._events = self._events, []
        return events

    def _text_char(self, c: str) -> None:
        if self._boundary:
            if c.isspace():
                self._held.append(c)
                return
            if c in "{[":
                self._held.append(c)
                if c == "{":
                    self._open_call()
                else:
                    self._state, self._in_array = "array", True
                return
            self._boundary = False
            if self._calls:
                self._held = []  # whitespace between calls and text is not kept
            self._release()
        held = "".join(self._held) + c
        if TOOL_CALL_OPEN.startswith(held):
            self._held.append(c)
            if held == TOOL_CALL_OPEN:
                self._state, self._in_tag = "tag", True
            return
        if c == "<":
            self._release()
            self._held = ["<"]
        else:
            self._held = []
            self._content(held)

    def _tag_char(self, c: str) -> None:
        """After `<tool_call>` or a bare `[`: whitespace, then the call's `{`."""
        if c.isspace():
            self._held.append(c)
        elif c == "{":
            self._held.append(c)
            self._open_call()
        else:
            self._revert(c)

    _array_char = _tag_char

    def _array_sep_char(self, c: str) -> None:
        if c.isspace():
            return
        if c == ",":
            self._state = "array"
        elif c == "]":
            self._state, self._in_array, self._boundary = "text", False, True
        else:
            self._state, self._in_array, self._boundary = "text", False, False
            self._text_char(c)

    def _open_call(self) -> None:
        self._call = _Call()
        self._call.scanner.feed("{")
        self._state = "call"

    def _call_char(self, c: str) -> None:
        call = self._call
        assert call is not None
        scanner = call.scanner
        scanner.feed(c)
        if call.index is None:
            self._held.append(c)
            if scanner.foreign or (scanner.closed and scanner.name is None):
                self._revert(None)
                return
            if scanner.name is None:
                return
            if scanner.name not in self._names:
                self._revert(None)
                return
            call.index = self._calls
            self._calls += 1
            self._held = []
            self._events.append(CallStart(call.index, self._new_id(), scanner.name))
        self._send_arguments(call)
        if scanner.closed:
            self._close_call(call)

    def _send_arguments(self, call: _Call) -> None:
        scanner = call.scanner
        assert call.index is not None
        args = scanner.args
        streamable = not (args and args[0] == '"') or scanner.args_done
        piece = "".join(args[call.sent :]) if streamable else ""
        call.sent = len(args) if streamable else call.sent
        if piece:
            last = self._events[-1] if self._events else None
            if isinstance(last, ArgumentsDelta) and last.index == call.index:
                self._events[-1] = ArgumentsDelta(call.index, last.text + piece)
            else:
                self._events.append(ArgumentsDelta(call.index, piece))

    def _close_call(self, call: _Call) -> None:
        assert call.index is not None
        if not "".join(call.scanner.args):
            self._events.append(ArgumentsDelta(call.index, "{}"))
        self._call = None
        if self._in_tag:
            self._state = "after_tag"
        elif self._in_array:
            self._state = "array_sep"
        else:
            self._state, self._boundary = "text", True

    def _after_tag_char(self, c: str) -> None:
        held = "".join(self._held).lstrip() + c
        if c.isspace() and not held.strip():
            self._held.append(c)
            return
        if TOOL_CALL_CLOSE.startswith(held):
            self._held.append(c)
            if held == TOOL_CALL_CLOSE:
                self._held = []
                self._state, self._in_tag, self._boundary = "text", False, True
            return
        self._held = [h for h in self._held if not h.isspace()]
        self._revert(c)

    def finish(self) -> list[ToolEvent]:
        """The output ended: a confirmed call stays as generated; held text is content (whitespace after a
        call and an unclosed `</tool_call>` are dropped)."""
        call = self._call
        if call is not None and call.index is not None:
            self._send_arguments(call)
            if not call.sent:
                self._events.append(ArgumentsDelta(call.index, "{}"))
        elif self._state == "after_tag" or (self._boundary and self._calls):
            self._held = []
        self._release()
        self._call = None
        return self._take()


@dataclass(frozen=True)
class ParsedCall:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None
    calls: tuple[ParsedCall, ...]


def collect(events: Sequence[ToolEvent]) -> ParsedOutput:
    """The whole answer from its events: content joined; each call's arguments joined."""
    content: list[str] = []
    starts: list[CallStart] = []
    arguments: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, ContentDelta):
            content.append(event.text)
        elif isinstance(event, CallStart):
            starts.append(event)
            arguments[event.index] = []
        else:
            arguments[event.index].append(event.text)
    text = "".join(content)
    if not starts:
        return ParsedOutput(text, ())
    calls = tuple(ParsedCall(s.id, s.name, "".join(arguments[s.index])) for s in starts)
    return ParsedOutput(text.strip() or None, calls)


def parse_output(text: str, names: frozenset[str]) -> ParsedOutput:
    """Parse a whole generated text (the same parser the stream uses)."""
    parser = ToolCallParser(names)
    return collect(parser.feed(text) + parser.finish())
