"""Modal screens: sampling settings, a text editor (system prompt, edit message), a
one-line input (rename, attach), a pick list (search, switch model, detach), the keys
help, and a confirmation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Markdown, OptionList, Static, TextArea
from textual.widgets.option_list import Option

from .protocol import SamplingSettings

# (field, label, what its special value means)
SETTING_FIELDS = [
    ("temperature", "Temperature", "0 = greedy"),
    ("top_p", "Top p", "1 = off"),
    ("top_k", "Top k", "0 = off"),
    ("min_p", "Min p", "0 = off"),
    ("repetition_penalty", "Repetition penalty", "empty = off"),
    ("max_tokens", "Max tokens", ""),
    ("seed", "Seed", "empty = random"),
]
_OPTIONAL = {"repetition_penalty", "seed"}
_WHOLE = {"top_k", "max_tokens", "seed"}


def _shown(value: Any) -> str:
    return "" if value is None else str(value)


def _default_text(name: str, value: Any) -> str:
    if value is None:
        return "off" if name == "repetition_penalty" else "random"
    return str(value)


def parse_settings(values: dict[str, str]) -> SamplingSettings | str:
    """Settings from text fields, or a sentence naming the first field that is wrong."""
    parsed: dict[str, Any] = {}
    labels = {name: label for name, label, _ in SETTING_FIELDS}
    for name, _, _ in SETTING_FIELDS:
        text = values[name].strip()
        if not text and name in _OPTIONAL:
            parsed[name] = None
            continue
        try:
            parsed[name] = int(text) if name in _WHOLE else float(text)
        except ValueError:
            kind = "a whole number" if name in _WHOLE else "a number"
            return f"{labels[name]} must be {kind}; “{text}” is not."
    settings = SamplingSettings(**parsed)
    return settings.problem() or settings


@dataclass(frozen=True)
class SettingsResult:
    settings: SamplingSettings
    as_default: bool  # also the app-wide default for new chats


class SettingsScreen(ModalScreen[SettingsResult | None]):
    """The chat's sampling settings; each label states the app-wide default."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "save(False)", "Save for this chat"),
    ]

    def __init__(self, settings: SamplingSettings, defaults: SamplingSettings) -> None:
        super().__init__(classes="dialog-screen")
        self.settings = settings
        self.defaults = defaults

    def compose(self) -> ComposeResult:
        with Vertical(id="settings", classes="dialog"):
            yield Label("Sampling settings", classes="dialog-title")
            yield Label(
                "These apply to this chat. New chats start from the defaults; "
                "“Save as default” also makes these the defaults.",
                classes="dialog-hint",
            )
            with Grid(id="settings-grid"):
                for name, label, note in SETTING_FIELDS:
                    default = _default_text(name, getattr(self.defaults, name))
                    extra = f"; {note}" if note else ""
                    yield Label(f"{label} (default {default}{extra})")
                    yield Input(_shown(getattr(self.settings, name)), id=name, compact=True)
            yield Static("", id="settings-error", classes="dialog-error", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save for this chat (ctrl+s)", variant="primary", id="save")
                yield Button("Save as default", id="default")
                yield Button("Cancel", id="cancel")

    def _read(self) -> SamplingSettings | str:
        names = [f.name for f in fields(SamplingSettings)]
        return parse_settings({n: self.query_one(f"#{n}", Input).value for n in names})

    def action_save(self, as_default: bool) -> None:
        result = self._read()
        if isinstance(result, str):
            self.query_one("#settings-error", Static).update(result)
            return
        self.dismiss(SettingsResult(result, as_default))

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_input_submitted(self) -> None:
        self.action_save(False)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save(False)
        elif event.button.id == "default":
            self.action_save(True)
        else:
            self.action_cancel()


class TextEditScreen(ModalScreen[str | None]):
    """Edit a block of text (the system prompt, the last message); Ctrl+S saves."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "save", "Save"),
    ]

    def __init__(self, title: str, text: str, hint: str = "") -> None:
        super().__init__(classes="dialog-screen")
        self.title_text = title
        self.text = text
        self.hint = hint

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog text-dialog"):
            yield Label(self.title_text, classes="dialog-title")
            if self.hint:
                yield Label(self.hint, classes="dialog-hint")
            yield TextArea(self.text, id="editor", soft_wrap=True)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save (ctrl+s)", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        editor = self.query_one("#editor", TextArea)
        editor.move_cursor(editor.document.end)  # go on typing where the text ends
        editor.focus()

    def action_save(self) -> None:
        self.dismiss(self.query_one("#editor", TextArea).text)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        else:
            self.action_cancel()


class LineInputScreen(ModalScreen[str | None]):
    """One line of text (a chat's title, a file to attach); Enter saves, Esc cancels."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, value: str = "", hint: str = "", placeholder: str = "") -> None:
        super().__init__(classes="dialog-screen")
        self.title_text = title
        self.value = value
        self.hint = hint
        self.placeholder = placeholder

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="dialog-title")
            if self.hint:
                yield Label(self.hint, classes="dialog-hint")
            yield Input(self.value, placeholder=self.placeholder, id="line", select_on_focus=False)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


PickOptions = Sequence[tuple[str, Any]]  # (label, value)


class PickScreen(ModalScreen[Any]):
    """Choose one of a list: Up/Down and Enter, or type to narrow it down.

    ``options(query)`` gives the list for what is typed (a search, a filter).
    With ``free_text``, Enter on text that matches nothing returns the text itself
    (a model folder or repo id that is not listed yet).
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel"),
        Binding("down", "cursor(1)", show=False),
        Binding("up", "cursor(-1)", show=False),
    ]

    def __init__(
        self,
        title: str,
        options: Callable[[str], PickOptions],
        *,
        placeholder: str = "Type to search",
        hint: str = "",
        free_text: bool = False,
        empty: str = "Nothing found.",
    ) -> None:
        super().__init__(classes="dialog-screen")
        self.title_text = title
        self.options = options
        self.placeholder = placeholder
        self.hint = hint
        self.free_text = free_text
        self.empty = empty
        self.values: list[Any] = []

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog pick-dialog"):
            yield Label(self.title_text, classes="dialog-title")
            if self.hint:
                yield Label(self.hint, classes="dialog-hint")
            yield Input(placeholder=self.placeholder, id="query")
            yield OptionList(id="choices", markup=False)
            yield Static("", id="pick-empty", classes="dialog-hint", markup=False)

    def on_mount(self) -> None:
        self.refill("")

    def refill(self, query: str) -> None:
        choices = self.query_one("#choices", OptionList)
        found = list(self.options(query))
        self.values = [value for _, value in found]
        choices.clear_options()
        choices.add_options(Option(label) for label, _ in found)
        choices.highlighted = 0 if found else None
        self.query_one("#pick-empty", Static).update("" if found else self.empty)

    @on(Input.Changed, "#query")
    def _typed(self, event: Input.Changed) -> None:
        self.refill(event.value)

    def action_cursor(self, step: int) -> None:
        choices = self.query_one("#choices", OptionList)
        if choices.option_count:
            current = choices.highlighted or 0
            choices.highlighted = max(0, min(choices.option_count - 1, current + step))

    @on(Input.Submitted, "#query")
    def _entered(self, event: Input.Submitted) -> None:
        choices = self.query_one("#choices", OptionList)
        if choices.highlighted is not None and self.values:
            self.dismiss(self.values[choices.highlighted])
        elif self.free_text and event.value.strip():
            self.dismiss(event.value.strip())

    @on(OptionList.OptionSelected, "#choices")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.values[event.option_index])

    def action_cancel(self) -> None:
        self.dismiss(None)


# The app's own keys, for the Keys help. Why these keys: see GraniteChatApp.BINDINGS.
KEYS_HELP = """\
| Key | What it does |
|---|---|
| Enter | send the message |
| Ctrl+J | new line (Shift+Enter too, where the terminal tells them apart) |
| Up (in an empty message box) | edit your last message |
| Esc | stop the answer; back to the message box |
| Ctrl+C | stop the answer; copy selected text; when idle, press twice to quit |
| Ctrl+R | answer again (earlier answers kept as variants) |
| Ctrl+N | new chat |
| Ctrl+F | search chats |
| Ctrl+S | sampling settings |
| Ctrl+B | show or hide the chat list (in tmux: Ctrl+B twice) |
| Ctrl+P | all commands: model, documents, rename, export, delete... |
| Ctrl+Q | quit |
| Tab, Shift+Tab | chat list, messages, message box |
| Up, Down (on a message) | previous / next message |
| Enter, Ctrl+K (on a message) | copy the message / its code |
| Left, Right (on the last answer) | earlier / later variant |
| Up, Down, Enter (in the chat list) | choose a chat |
| Any letter | goes to the message box, wherever the focus is |

Type `/attach PATH` in the message box to attach a file as a document.
"""


class KeysScreen(ModalScreen[None]):
    """The app's keys (not the text editor's): what the palette's "Keys" shows."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,enter,q", "close", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog keys-dialog"):
            yield Label("Keys", classes="dialog-title")
            with VerticalScroll():
                yield Markdown(KEYS_HELP)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Close (esc)", id="close")

    def __init__(self) -> None:
        super().__init__(classes="dialog-screen")

    def action_close(self) -> None:
        self.dismiss(None)

    def on_button_pressed(self) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question: y confirms; n, Esc, or Enter (Cancel has focus) declines."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str, confirm_label: str = "Delete") -> None:
        super().__init__(classes="dialog-screen")
        self.question = question
        self.confirm_label = confirm_label

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog confirm-dialog"):
            yield Label(self.question, classes="dialog-title", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button(f"{self.confirm_label} (y)", variant="error", id="yes")
                yield Button("Cancel (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()  # a stray Enter must not delete

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")
