"""vlmrl's tests. A regular package, not a namespace one: crafter's dependency opensimplex
installs a top-level ``tests`` package into site-packages, which would otherwise shadow this one
(``from tests.tui_rundir import ...`` then fails)."""
