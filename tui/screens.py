"""Modal screens: sampling settings, a text editor (system prompt, edit message), confirm."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.validation import Integer, Number
from textual.widgets import Button, Input, Label, TextArea

from .protocol import SamplingSettings


class SettingsScreen(ModalScreen[SamplingSettings | None]):
    """Temperature, top_p, top_k, max tokens and seed; dismisses with the new settings."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "save", "Save"),
    ]

    def __init__(self, settings: SamplingSettings) -> None:
        super().__init__(classes="dialog-screen")
        self.settings = settings

    def compose(self) -> ComposeResult:
        s = self.settings
        with Vertical(id="settings", classes="dialog"):
            yield Label("Sampling settings", classes="dialog-title")
            with Grid(id="settings-grid"):
                yield Label("Temperature (0 = greedy)")
                yield Input(str(s.temperature), id="temperature", validators=[Number(0, 5)])
                yield Label("Top p (0-1, 1 = off)")
                yield Input(str(s.top_p), id="top_p", validators=[Number(0, 1)])
                yield Label("Top k (0 = off)")
                yield Input(str(s.top_k), id="top_k", validators=[Integer(0)])
                yield Label("Max tokens")
                yield Input(str(s.max_tokens), id="max_tokens", validators=[Integer(1)])
                yield Label("Seed (empty = random)")
                yield Input("" if s.seed is None else str(s.seed), id="seed")
            yield Label("", id="settings-error", classes="dialog-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def _read(self) -> SamplingSettings | str:
        """The settings from the form, or a message saying which field is wrong."""
        values: dict[str, str] = {
            name: self.query_one(f"#{name}", Input).value.strip()
            for name in ("temperature", "top_p", "top_k", "max_tokens", "seed")
        }
        try:
            settings = SamplingSettings(
                temperature=float(values["temperature"]),
                top_p=float(values["top_p"]),
                top_k=int(values["top_k"]),
                max_tokens=int(values["max_tokens"]),
                seed=int(values["seed"]) if values["seed"] else None,
            )
        except ValueError:
            return "Every field must be a number (top k, max tokens and seed whole numbers)."
        if not 0 <= settings.temperature <= 5:
            return "Temperature must be between 0 and 5."
        if not 0 < settings.top_p <= 1:
            return "Top p must be above 0 and at most 1."
        if settings.top_k < 0 or settings.max_tokens < 1:
            return "Top k must be 0 or more, max tokens 1 or more."
        return settings

    def action_save(self) -> None:
        result = self._read()
        if isinstance(result, str):
            self.query_one("#settings-error", Label).update(result)
            return
        self.dismiss(result)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_input_submitted(self) -> None:
        self.action_save()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
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

    def action_save(self) -> None:
        self.dismiss(self.query_one("#editor", TextArea).text)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        else:
            self.action_cancel()


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
