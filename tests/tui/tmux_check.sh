#!/usr/bin/env bash
# Real-terminal check of the chat app, scripted through tmux.
#
# Starts `granite-chat --fake-engine` (the scripted model) in a detached tmux pane,
# types a message and checks the streamed answer on screen, stops a long answer with
# Esc, quits with ctrl+q, then checks that the app exited cleanly, left no process
# behind, and saved both chats' messages (the stopped one marked stopped).
#
# Usage: tests/tui/tmux_check.sh        (PYTHON=... to pick the interpreter)
# Exit status 0 on success; the screens it saw are kept in $WORK/*.txt on failure.

set -euo pipefail

PYTHON=${PYTHON:-python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/granite-tmux-check.XXXXXX")
SESSION="granite-tui-check-$$"
DATA="$WORK/data"
STEP=start

command -v tmux >/dev/null || { echo "tmux is not installed (apt-get install tmux)"; exit 2; }

cleanup() {
    local status=$?
    tmux kill-session -t "$SESSION" 2>/dev/null || true
    if [ $status -eq 0 ]; then
        rm -rf "$WORK"
    else
        echo "FAILED at step '$STEP'; screens and logs kept in $WORK"
    fi
}
trap cleanup EXIT

screen() { tmux capture-pane -p -t "$SESSION"; }

# wait_for TEXT SECONDS: poll the pane until TEXT shows up.
wait_for() {
    local text=$1 limit=$2 waited=0
    while ! screen | grep -qF -- "$text"; do
        sleep 0.2
        waited=$((waited + 1))
        if [ $((waited / 5)) -ge "$limit" ]; then
            screen > "$WORK/$STEP.txt" || true
            echo "timed out after ${limit}s waiting for: $text"
            return 1
        fi
    done
}

# The app runs under `sh -c`; its exit status goes to a file so we can check it.
# (Textual draws on stderr, so stderr must stay on the pane.) The paths are quoted in
# the pane command, so the tmux server's own command line never matches the pgrep below.
tmux new-session -d -s "$SESSION" -x 110 -y 34 \
    "$PYTHON -m granite_mlx.tui.app --fake-engine --data-dir '$DATA' --export-dir '$WORK'; \
     echo \$? > '$WORK/exit_status'; sleep 1"

STEP=startup
wait_for "Enter sends" 120            # importing the library can take a while
wait_for "New chat" 10                # the footer is drawn
# The app is the pane shell's child; remember its pid (and any children it starts).
PANE_PID=$(tmux display-message -p -t "$SESSION" '#{pane_pid}')
APP_PID=$(pgrep -P "$PANE_PID" | head -n 1)
[ -n "$APP_PID" ] || { echo "cannot find the app's process"; exit 1; }

STEP=send
tmux send-keys -t "$SESSION" -l "hello from tmux"
tmux send-keys -t "$SESSION" Enter
wait_for "You said: hello from tmux" 20
wait_for "tok/s" 20                   # the stats footer: the answer is complete
screen > "$WORK/answer.txt"
grep -qF "def greet(name):" "$WORK/answer.txt"   # the code block is on screen

STEP=stop
tmux send-keys -t "$SESSION" C-n      # a new chat for the long answer
tmux send-keys -t "$SESSION" -l "now something long"
tmux send-keys -t "$SESSION" Enter
wait_for "Line 3:" 20
tmux send-keys -t "$SESSION" Escape
wait_for "stopped ·" 20
screen > "$WORK/stopped.txt"

STEP=quit
tmux send-keys -t "$SESSION" C-q
for _ in $(seq 1 50); do
    [ -s "$WORK/exit_status" ] && break
    sleep 0.2
done
[ -s "$WORK/exit_status" ] || { echo "the app did not exit after ctrl+q"; exit 1; }
status=$(cat "$WORK/exit_status")
[ "$status" = 0 ] || { echo "the app exited with status $status"; exit 1; }

STEP=leftovers
sleep 0.5
if kill -0 "$APP_PID" 2>/dev/null; then
    echo "the app (pid $APP_PID) is still running"; exit 1
fi
if pgrep -P "$APP_PID" >/dev/null || pgrep -f -- "--data-dir $DATA" >/dev/null; then
    echo "a process of the app is still running:"; pgrep -af -- "--data-dir $DATA"; exit 1
fi

STEP=database
"$PYTHON" - "$DATA/chats.sqlite3" <<'EOF'
import sqlite3, sys
rows = sqlite3.connect(sys.argv[1]).execute(
    "SELECT role, status, length(content) FROM messages ORDER BY id").fetchall()
assert [r[:2] for r in rows] == [
    ("user", "done"), ("assistant", "done"), ("user", "done"), ("assistant", "stopped")
], rows
assert rows[3][2] > 0, "the stopped answer kept its partial text"
EOF

echo "tmux check passed: streamed answer shown, Esc stopped one, ctrl+q quit cleanly,"
echo "no process left behind, 4 messages saved (last one stopped)."
