"""Modal screens: confirmation, the quit question for a run the app started, and help."""

from __future__ import annotations

from typing import Iterable

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static

MODAL_CSS = """
{name} {{ align: center middle; }}
{name} > Vertical {{
    width: auto; max-width: 90%; height: auto; max-height: 90%;
    padding: 1 2; border: thick $primary; background: $surface;
}}
{name} .question {{ width: auto; max-width: 80; margin-bottom: 1; }}
{name} Horizontal {{ width: auto; height: auto; }}
{name} Button {{ margin: 0 1; }}
"""


class ConfirmScreen(ModalScreen[bool]):
    """Yes/no question; dismisses with True only on an explicit yes."""

    DEFAULT_CSS = MODAL_CSS.format(name="ConfirmScreen")
    BINDINGS = [
        Binding("y", "answer(True)", "Yes", id="confirm.yes"),
        Binding("n,escape", "answer(False)", "No", id="confirm.no"),
    ]

    def __init__(self, question: str, yes: str = "Yes", no: str = "Cancel") -> None:
        super().__init__()
        self.question = question
        self.yes = yes
        self.no = no

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question, classes="question")
            with Horizontal():
                yield Button(f"{self.yes} (y)", variant="error", id="yes")
                yield Button(f"{self.no} (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class QuitScreen(ModalScreen[str | None]):
    """Closing the app while the run it started is alive: stop it or leave it running."""

    DEFAULT_CSS = MODAL_CSS.format(name="QuitScreen")
    BINDINGS = [
        Binding("s", "choose('stop')", "Stop the run", id="quit.stop"),
        Binding("l", "choose('leave')", "Leave it running", id="quit.leave"),
        Binding("escape,c", "choose(None)", "Cancel", id="quit.cancel"),
    ]

    def __init__(self, run_dir: str) -> None:
        super().__init__()
        self.run_dir = run_dir

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(
                "This dashboard started the run. Stop it, or leave it running headless?\n"
                f"(reattach later with: vlmrl-tui --attach {self.run_dir})",
                classes="question",
            )
            with Horizontal():
                yield Button("Stop the run (s)", variant="error", id="stop")
                yield Button("Leave running (l)", variant="primary", id="leave")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#cancel", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None if event.button.id == "cancel" else event.button.id)

    def action_choose(self, choice: str | None) -> None:
        self.dismiss(choice)


class HelpScreen(ModalScreen[None]):
    """Every key binding, grouped by where it applies."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Vertical {
        width: 90; max-width: 95%; height: 90%; border: thick $primary; background: $surface; padding: 0 1;
    }
    HelpScreen #help-title { text-style: bold; padding: 1 0; }
    """
    BINDINGS = [Binding("escape,q,question_mark,f1", "dismiss", "Close", id="help.close")]

    def __init__(self, groups: Iterable[tuple[str, Iterable[Binding]]], intro: str = "") -> None:
        super().__init__()
        self.groups = [(title, list(bindings)) for title, bindings in groups]
        self.intro = intro

    @staticmethod
    def key_label(binding: Binding) -> str:
        if binding.key_display:
            return binding.key_display
        names = {"left_square_bracket": "[", "right_square_bracket": "]", "question_mark": "?", "slash": "/"}
        return ", ".join(names.get(k, k) for k in binding.key.split(","))

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("vlmrl — keys (Esc closes; Ctrl+P opens the command palette)", id="help-title")
            with VerticalScroll():
                if self.intro:
                    yield Static(Text(self.intro, style="dim"))
                for title, bindings in self.groups:
                    table = Table(title=title, title_justify="left", title_style="bold", expand=True, box=None)
                    table.add_column("key", style="bold cyan", width=16)
                    table.add_column("action")
                    table.add_column("id", style="dim")
                    for b in bindings:
                        if b.show:
                            table.add_row(self.key_label(b), b.description or b.action, b.id or "")
                    yield Static(table)
