"""Unit conversion (book chapter 15's tools) with pint, the well-kept units library: `convert(3, "miles", "km")`.

Quantities are converted exactly as pint defines its units (its default registry); temperatures with an offset
(degC, degF) convert as temperatures, not differences. An unknown unit or units of different dimensions is a
`ToolError` naming the problem.
"""

from __future__ import annotations

import functools
from typing import Any

from torchbook.chat.tools.registry import ToolError


@functools.cache
def registry() -> Any:
    import pint  # optional (the chat extra); its registry takes a moment to build, once

    return pint.UnitRegistry(autoconvert_offset_to_baseunit=True)


def convert(value: float, from_unit: str, to_unit: str) -> tuple[float, str]:
    """`value` `from_unit` in `to_unit`: (the number, the unit as pint spells it)."""
    import pint

    ureg = registry()
    try:
        quantity = ureg.Quantity(value, ureg.parse_units(from_unit.strip()))
        target = ureg.parse_units(to_unit.strip())
        result = quantity.to(target)
    except pint.errors.UndefinedUnitError as e:
        raise ToolError(f"unknown unit {e.unit_names if isinstance(e.unit_names, str) else ', '.join(e.unit_names)!r}"
                        ) from None
    except pint.errors.DimensionalityError as e:
        raise ToolError(f"cannot convert {from_unit} ({e.dim1}) to {to_unit} ({e.dim2})") from None
    except (pint.errors.PintError, ValueError, TypeError, AttributeError, AssertionError) as e:
        raise ToolError(f"cannot read the units {from_unit!r} and {to_unit!r}: {e}") from None
    return float(result.magnitude), f"{result.units:~}" or str(result.units)


def convert_text(value: float, from_unit: str, to_unit: str) -> str:
    number, unit = convert(value, from_unit, to_unit)
    return f"{value:g} {from_unit} = {number:.10g} {unit}"
