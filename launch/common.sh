# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run).
# Bash >= 3.2 (macOS's /bin/bash too): empty arrays expand as ${a[@]+"${a[@]}"} under `set -u`.

die() {
  echo "error: $*" >&2
  exit 2
}

# Prints one argument so that a POSIX shell reads it back unchanged.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints the arguments as one shell-quoted command line.
quote_all() {
  local out="" arg
  for arg in "$@"; do
    out+="${out:+ }$(quote "$arg")"
  done
  printf '%s' "$out"
}

# Value of an option given as `--opt=VALUE` or `--opt VALUE`: sets VALUE, and SHIFT to the number
# of words used.
# shellcheck disable=SC2034 # the caller reads VALUE and SHIFT
option_value() {
  if [[ $1 == *=* ]]; then
    VALUE="${1#*=}"
    SHIFT=1
  else
    (($# >= 2)) || die "$1 needs a value"
    VALUE="$2"
    SHIFT=2
  fi
  [[ -n $VALUE ]] || die "${1%%=*} needs a non-empty value"
}
