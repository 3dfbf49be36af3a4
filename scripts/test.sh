#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need, checks
# formatting, vet and staticcheck, runs the whole suite with the race
# detector against real servers, and runs every fuzz target briefly.
#
# Environment:
#   FUZZTIME   per fuzz target (default 3s; 0 skips fuzzing)
#   CI         set by default here: a test whose real server is missing
#              fails instead of skipping
set -euo pipefail
cd "$(dirname "$0")/.."
command -v go >/dev/null 2>&1 || export PATH="$PATH:/usr/local/go/bin"
export CI="${CI:-1}"
FUZZTIME="${FUZZTIME:-3s}"

step() { printf '\n==> %s\n' "$*" >&2; }

step "installing test dependencies"
scripts/install-test-deps.sh

step "gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then
  echo "gofmt would change:" >&2
  echo "$unformatted" >&2
  exit 1
fi

step "go vet"
go vet ./...

step "staticcheck"
go run honnef.co/go/tools/cmd/staticcheck@v0.8.2 ./...

step "tests (race detector on)"
go test -race -count=1 -timeout 12m ./...

if [ "$FUZZTIME" != "0" ]; then
  step "fuzzing each target for $FUZZTIME"
  # Every decoder has a fuzz target; list them from the source so a new one
  # is never forgotten.
  grep -rl --include='*_test.go' '^func Fuzz' internal | while read -r file; do
    pkg="./$(dirname "$file")"
    for target in $(grep -o '^func Fuzz[A-Za-z0-9_]*' "$file" | cut -d' ' -f2); do
      echo "fuzz $pkg $target" >&2
      go test -run '^$' -fuzz "^${target}\$" -fuzztime "$FUZZTIME" "$pkg" >/dev/null
    done
  done
fi
step "all tests passed"
