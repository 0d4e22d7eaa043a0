"""Writing into a run's folders safely: checked before any long work, never over earlier files."""

import os


def check_writable(folder: str, flag: str = "--workdir") -> None:
  """Fails with one line, naming `flag`, when `folder` cannot be created or written."""
  try:
    os.makedirs(folder, exist_ok=True)
    probe = os.path.join(folder, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"{flag}={folder} is not writable ({e.strerror}); choose another.") from None


def unused_stem(stem: str, suffixes: tuple[str, ...]) -> str:
  """`stem`, else `stem_2`, `stem_3`, ...: the first for which no `stem + suffix` exists yet."""
  candidate, n = stem, 1
  while any(os.path.exists(candidate + suffix) for suffix in suffixes):
    n += 1
    candidate = f"{stem}_{n}"
  return candidate
