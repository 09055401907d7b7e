"""Forms built with magicgui from the core's settings dataclasses.

A :class:`Field` says how one setting is shown (widget kind, range, the text shown at the
minimum such as "auto" or "off", a unit); its default value comes from the dataclass and its
tooltip from the dataclass's numpydoc ``Parameters`` section, so the form, the CLI and the
Python API describe a setting in one place. :func:`build_form` makes the magicgui widgets,
wrapped in a :class:`Form` whose :meth:`Form.values` gives the settings' keyword arguments back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Field", "Form", "build_form", "parameter_docs"]

_UNSET: Any = object()


@dataclass(frozen=True)
class Field:
    """How one setting of a dataclass appears in a form.

    Parameters
    ----------
    name : str
        The dataclass field (or a name of the form's own when ``default`` is given).
    label : str
        The row's label.
    kind : str
        ``"int"``, ``"float"``, ``"choice"`` or ``"bool"``.
    low, high, step : float
        Range and step of a number.
    choices : tuple of str
        Items of a choice.
    special : str
        Shown instead of the minimum of a number (e.g. ``"auto"``); the minimum then means
        ``None`` for the setting when ``none_at_low`` is set.
    none_at_low : bool
        The minimum of a number stands for ``None``.
    suffix : str
        Unit shown after a number.
    text : str
        A check box's text (its row has no label).
    tooltip : str
        Overrides the tooltip taken from the dataclass's docstring.
    default : Any
        A value for a form-only field that the dataclass does not have.
    get : callable
        Maps the settings' value to the widget's (e.g. ``TileConfig`` to its tile edge).
    """

    name: str
    label: str
    kind: str = "int"
    low: float = 0
    high: float = 10**7
    step: float = 1
    choices: tuple[str, ...] = ()
    special: str = ""
    none_at_low: bool = False
    suffix: str = ""
    text: str = ""
    tooltip: str = ""
    default: Any = _UNSET
    get: Callable[[Any], Any] | None = None


def parameter_docs(cls: type) -> dict[str, str]:
    """The numpydoc ``Parameters`` of ``cls``'s docstring: name -> description (one line)."""
    doc = cls.__doc__ or ""
    match = re.search(r"Parameters\n\s*-+\n(.*?)(?:\n\s*\n\s*[A-Z][a-z]+\n\s*-+\n|\Z)", doc, re.S)
    if not match:
        return {}
    out: dict[str, str] = {}
    name = None
    for line in match.group(1).splitlines():
        head = re.match(r"^ {4}(\w+)(?:, \w+)* : ", line)
        if head:
            name = head.group(1)
            out[name] = ""
        elif name and line.strip():
            out[name] = (out[name] + " " + line.strip()).strip()
    # reStructuredText roles and literals read as plain words in a tooltip
    return {k: re.sub(r"``([^`]+)``", r"\1",
                      re.sub(r":\w+:`~?(?:[\w.]+\.)?([^`.]+)`", r"\1", v))
            for k, v in out.items()}


class Form:
    """magicgui widgets for settings, and how to read them back.

    ``form["snap"]`` is the magicgui widget of a field (``.value`` reads and sets it),
    :meth:`add_rows` lays the widgets out in a Qt form layout (beside rows of other widgets),
    :meth:`values` gives the settings' keyword arguments.
    """

    def __init__(self, widgets: dict[str, Any], fields: Sequence[Field]) -> None:
        self.widgets = widgets
        self.fields = {f.name: f for f in fields}

    def __getitem__(self, name: str) -> Any:
        return self.widgets[name]

    def add_rows(self, layout: Any) -> None:
        """Add a row per field to ``layout`` (a ``QFormLayout``); check boxes span the row."""
        for name, widget in self.widgets.items():
            f = self.fields[name]
            if f.kind == "bool":
                layout.addRow(widget.native)
            else:
                layout.addRow(f.label, widget.native)

    def values(self) -> dict[str, Any]:
        """The values as keyword arguments: whole numbers as ``int``, the minimum as ``None``
        where the field says so."""
        out: dict[str, Any] = {}
        for name, widget in self.widgets.items():
            f, value = self.fields[name], widget.value
            if f.kind in ("int", "float"):
                if f.none_at_low and value <= f.low:
                    value = None
                elif f.kind == "int":
                    value = int(round(value))
            out[name] = value
        return out


def build_form(cls: type, fields: Sequence[Field], **values: Any) -> Form:
    """magicgui widgets, one per field, with the dataclass's defaults and tooltips.

    Parameters
    ----------
    cls : type
        The settings dataclass the fields come from (defaults and tooltips).
    fields : sequence of Field
        The rows, in order.
    values : Any
        Initial values that replace the dataclass's defaults.
    """
    from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox

    defaults = cls()
    docs = parameter_docs(cls)
    widgets: dict[str, Any] = {}
    for f in fields:
        if f.name in values:
            value = values[f.name]
        elif f.default is not _UNSET:
            value = f.default
        else:
            value = getattr(defaults, f.name)
        if f.get is not None:
            value = f.get(value)
        tip = f.tooltip or docs.get(f.name, "")
        if f.kind == "choice":
            w = ComboBox(name=f.name, choices=f.choices, value=value, tooltip=tip)
        elif f.kind == "bool":
            w = CheckBox(name=f.name, text=f.text or f.label, value=bool(value), tooltip=tip)
        else:
            # a FloatSpinBox for whole numbers too: its Qt spin box shows units and "auto"
            w = FloatSpinBox(name=f.name, min=f.low, max=f.high, step=f.step,
                             value=f.low if value is None else value, tooltip=tip)
            spin = w.native
            spin.setDecimals(0 if f.kind == "int" else 1)
            if f.suffix:
                spin.setSuffix(f" {f.suffix}")
            if f.special:
                spin.setSpecialValueText(f.special)
        widgets[f.name] = w
    return Form(widgets, fields)
