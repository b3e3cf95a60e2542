//! The shell scripts a deploy runs on each host. They are fixed text: everything that varies
//! (paths, release names, tags, tokens) reaches them as environment variables, never spliced
//! into the script (design invariant 8).
//!
//! Variables: `FERRY_PATH` (the environment's target directory), `FERRY_RELEASE` (release
//! directory name, `<tag>-<short sha>` made path-safe), `FERRY_SHA256` (artifact checksum),
//! `FERRY_TOKEN` (the step lease's fencing token), `FERRY_KEEP` (releases to keep).

/// Prints `present` when the release is already unpacked with the same checksum.
pub const PROBE: &str = r#"set -eu
marker="$FERRY_PATH/releases/$FERRY_RELEASE/.ferry-release"
if [ -f "$marker" ] && [ "$(cat "$marker")" = "$FERRY_SHA256" ]; then echo present; else echo absent; fi
"#;

/// Creates the directories an upload needs.
pub const PREPARE: &str = r#"set -eu
mkdir -p "$FERRY_PATH/.incoming" "$FERRY_PATH/releases"
"#;

/// Verifies the uploaded archive's checksum, unpacks it into a temporary directory, writes the
/// completion marker and renames the directory into place: a release directory either is
/// complete (with its marker) or does not exist. A release of the same name with other contents
/// (the tag rebuilt into other bytes) is replaced, except when `current` points to it: `current`
/// names the directory, so replacing it would change what runs before the switch, the restart
/// and the health check, with no way back.
pub const UNPACK: &str = r#"set -eu
cd "$FERRY_PATH"
incoming=".incoming/$FERRY_SHA256.tar.gz"
if [ -d "releases/$FERRY_RELEASE" ] && [ "$(readlink current 2>/dev/null || true)" = "releases/$FERRY_RELEASE" ]; then
  rm -f "$incoming"
  echo "release $FERRY_RELEASE is live with other contents (checksum $(cat "releases/$FERRY_RELEASE/.ferry-release" 2>/dev/null || echo unknown)), and is not replaced under current: deploy another release first" >&2
  exit 6
fi
sum=$(sha256sum "$incoming" | cut -d' ' -f1)
if [ "$sum" != "$FERRY_SHA256" ]; then
  echo "checksum mismatch after upload: expected $FERRY_SHA256, got $sum" >&2
  exit 3
fi
tmp="releases/.$FERRY_RELEASE.tmp"
rm -rf "$tmp"
mkdir -p "$tmp"
tar -xzf "$incoming" -C "$tmp" --no-same-owner --no-same-permissions
printf '%s' "$FERRY_SHA256" > "$tmp/.ferry-release"
rm -rf "releases/$FERRY_RELEASE"
mv "$tmp" "releases/$FERRY_RELEASE"
rm -f "$incoming"
"#;

/// Switches `current` to the release atomically (a symlink made under a temporary name, then
/// renamed over `current`), remembering the release it replaces for rollback: in the release
/// (`.ferry-previous`, which pruning spares) and, for this deploy's rollback, in
/// `.ferry-rollback-<token>`, written once per token (a resumed switch does not overwrite it),
/// so that redeploying the live release rolls back to it and not to what preceded it once.
/// Fenced on the host: under a lock, it refuses when a deploy with a newer fencing token
/// already switched.
pub const SWITCH: &str = r#"set -eu
cd "$FERRY_PATH"
exec 9>>.ferry-lock
flock 9
last=$(cat .ferry-token 2>/dev/null || echo 0)
if [ "$last" -gt "$FERRY_TOKEN" ]; then
  echo "fenced out: a deploy holding the newer token $last already switched this host" >&2
  exit 4
fi
target="releases/$FERRY_RELEASE"
[ -f "$target/.ferry-release" ] || { echo "release $FERRY_RELEASE is not unpacked" >&2; exit 3; }
previous=$(readlink current 2>/dev/null || true)
if [ -n "$previous" ] && [ "$previous" != "$target" ]; then
  printf '%s' "$previous" > "$target/.ferry-previous"
fi
[ -e ".ferry-rollback-$FERRY_TOKEN" ] || printf '%s' "$previous" > ".ferry-rollback-$FERRY_TOKEN"
ln -sfn "$target" .current.tmp
mv -T .current.tmp current
printf '%s' "$FERRY_TOKEN" > .ferry-token
"#;

/// Switches `current` back to what it was before this deploy switched it (`.ferry-rollback-<token>`;
/// for a host a deploy of an earlier attempt switched, the release's `.ferry-previous`).
pub const ROLLBACK: &str = r#"set -eu
cd "$FERRY_PATH"
exec 9>>.ferry-lock
flock 9
last=$(cat .ferry-token 2>/dev/null || echo 0)
if [ "$last" -gt "$FERRY_TOKEN" ]; then
  echo "fenced out: a deploy holding the newer token $last already switched this host" >&2
  exit 4
fi
if [ -e ".ferry-rollback-$FERRY_TOKEN" ]; then
  previous=$(cat ".ferry-rollback-$FERRY_TOKEN")
else
  previous=$(cat "releases/$FERRY_RELEASE/.ferry-previous" 2>/dev/null || true)
fi
if [ -z "$previous" ]; then
  echo "no previous release to roll back to" >&2
  exit 5
fi
ln -sfn "$previous" .current.tmp
mv -T .current.tmp current
printf '%s' "$FERRY_TOKEN" > .ferry-token
"#;

/// Removes releases beyond the newest `FERRY_KEEP`, never `current` nor the one before it, and
/// what failed uploads and unpacks left behind over a day ago.
pub const PRUNE: &str = r#"set -eu
find "$FERRY_PATH/.incoming" -maxdepth 1 -type f -mmin +1440 -exec rm -f {} + 2>/dev/null || true
find "$FERRY_PATH/releases" -mindepth 1 -maxdepth 1 -name '.*.tmp' -mmin +1440 -exec rm -rf {} + 2>/dev/null || true
(cd "$FERRY_PATH" && ls -1t .ferry-rollback-* 2>/dev/null | tail -n +6 | while IFS= read -r f; do rm -f -- "$f"; done)
cd "$FERRY_PATH/releases"
current=$(basename "$(readlink ../current 2>/dev/null || echo none)")
previous=$(basename "$(cat "$current/.ferry-previous" 2>/dev/null || echo none)")
ls -1t | tail -n +$((FERRY_KEEP + 1)) | while IFS= read -r r; do
  if [ "$r" != "$current" ] && [ "$r" != "$previous" ]; then rm -rf -- "$r"; fi
done
"#;

/// Runs one configured command (`FERRY_COMMAND`) in `FERRY_WORKDIR` (the new release for
/// `before_switch`, `current` afterwards).
/// With `FERRY_TIMEOUT` set (a transport that does not kill what a dropped script started:
/// SSH), and where the host has a `timeout` that takes `-k` (GNU coreutils, recent busybox),
/// the command and everything it started are stopped on the host too: `timeout` puts them in a
/// process group of their own and signals it, SIGTERM at `FERRY_TIMEOUT` seconds (status 124),
/// SIGKILL 5 s later (137). Elsewhere the agent's own bound only stops waiting for it.
pub const COMMAND: &str = r#"set -eu
cd "$FERRY_WORKDIR"
if [ -n "${FERRY_TIMEOUT:-}" ] && timeout -k 1 5 true 2>/dev/null; then
  exec timeout -k 5 "$FERRY_TIMEOUT" sh -c "$FERRY_COMMAND"
fi
exec sh -c "$FERRY_COMMAND"
"#;

/// What every script runs under on an SSH host (`$1` is the script): the host's side of "kill the
/// step's processes when its agent lets go" (design invariant 4), as the agent's watchdog is for
/// the local transport. The agent keeps the session's input open while it wants the script to
/// run; when it closes (the agent dropped the command on losing its lease, died, or lost the
/// connection), a watcher kills the script's process group (made with `setsid`), with whatever
/// the script started in it. The script itself reads no input (`/dev/null`). A script that ends
/// by a signal that ends processes (HUP, INT, QUIT, ABRT, KILL, PIPE, TERM: the shell's status
/// 128 + n) ends the wrapper by the same signal, so the agent sees it as before; other statuses
/// are passed on as they are. Hosts
/// without `setsid` run the script as it is: it then runs on until it ends or, for a command,
/// until its `command_timeout` ([`COMMAND`]).
pub const WATCH: &str = r#"exec 3<&0 0</dev/null
if ! command -v setsid >/dev/null 2>&1; then exec 3<&-; exec sh -c "$1"; fi
setsid sh -c "$1" 3<&- &
pid=$!
{ while IFS= read -r _; do :; done; kill -KILL "-$pid" 2>/dev/null; } <&3 &
watch=$!
exec 3<&-
wait "$pid"
status=$?
kill "$watch" 2>/dev/null
case "$status" in 129|130|131|134|137|141|143) kill -s "$(kill -l "$status")" "$$" ;; esac
exit "$status"
"#;
