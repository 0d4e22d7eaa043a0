"""benchmarks/RESULTS.md: every benchmark appends its table there, with date, device and command."""

import pathlib

HEADER = "# Benchmark results\n"


def append(path, text: str) -> None:
  """Appends `text` to the results file, creating it with its header when missing."""
  path = pathlib.Path(path)
  if not path.exists():
    path.write_text(HEADER)
  with path.open("a") as f:
    f.write(text if text.endswith("\n") else text + "\n")
  print(f"appended to {path}")
