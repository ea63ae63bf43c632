#!/usr/bin/env bash
# Real-terminal check of the chat app, scripted through tmux.
#
# Starts `granite-chat --fake-engine` (the scripted model) in a detached tmux pane,
# types a message and checks the streamed answer on screen, stops a long answer with
# Esc and another with Ctrl+C, sends a two-line message and checks both lines stay on
# screen, chooses the first chat from the sidebar (Tab, Down, Enter) and types into it,
# quits with ctrl+q, then checks that the app exited cleanly, left no process behind,
# and saved every message where it belongs.
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

# wait_count TEXT N SECONDS: poll the pane until TEXT shows up on N lines.
wait_count() {
    local text=$1 count=$2 limit=$3 waited=0
    while [ "$(screen | grep -cF -- "$text")" -lt "$count" ]; do
        sleep 0.2
        waited=$((waited + 1))
        if [ $((waited / 5)) -ge "$limit" ]; then
            screen > "$WORK/$STEP.txt" || true
            echo "timed out after ${limit}s waiting for $count line(s) with: $text"
            return 1
        fi
    done
}

# wait_for TEXT SECONDS: poll the pane until TEXT shows up.
wait_for() { wait_count "$1" 1 "$2"; }

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
wait_for "peak " 20                   # the final stats footer: the answer is complete
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

STEP=ctrl_c
tmux send-keys -t "$SESSION" C-n
tmux send-keys -t "$SESSION" -l "another long one"
tmux send-keys -t "$SESSION" Enter
wait_for "answering (Esc stops)" 20      # the title says so while it streams
wait_for "Line 3:" 20
tmux send-keys -t "$SESSION" C-c         # what ollama run / mlx_lm.chat users press
wait_for "stopped ·" 20
kill -0 "$APP_PID" || { echo "Ctrl+C during an answer quit the app"; exit 1; }

STEP=multiline
tmux send-keys -t "$SESSION" C-n
tmux send-keys -t "$SESSION" -l "first line"
tmux send-keys -t "$SESSION" C-j         # a new line in the message box
tmux send-keys -t "$SESSION" -l "second line"
tmux send-keys -t "$SESSION" Enter
wait_for "You said: first line" 20
wait_for "peak " 20
screen > "$WORK/multiline.txt"
# The user's message shows its two lines one under the other (not joined into one).
"$PYTHON" - "$WORK/multiline.txt" <<'EOF'
import re, sys
# Each screen line without the borders and bars drawn left of the text.
lines = [re.sub(r"^\W*", "", line).rstrip() for line in open(sys.argv[1], encoding="utf-8")]
at = [i for i, line in enumerate(lines) if line == "first line"]
assert at and lines[at[0] + 1] == "second line", "the two lines were not kept"
assert not any("first line second line" in line for line in lines), "the lines were joined"
EOF

STEP=sidebar
# Tab from the message box reaches the chat list (it wraps around); the list starts
# on the open chat, newest first, so three Downs reach the first chat.
tmux send-keys -t "$SESSION" Tab
tmux send-keys -t "$SESSION" Down Down Down Enter
wait_for "You said: hello from tmux" 10  # the first chat is shown
tmux send-keys -t "$SESSION" -l "picked from the list"   # typed straight away
tmux send-keys -t "$SESSION" Enter
wait_for "You said: picked from the list" 20
wait_count "peak " 2 20                   # both answers of chat 1 are complete

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
    "SELECT chat_id, role, status, content FROM messages ORDER BY id").fetchall()
assert [r[1:3] for r in rows] == [
    ("user", "done"), ("assistant", "done"),      # hello from tmux
    ("user", "done"), ("assistant", "stopped"),   # stopped with Esc
    ("user", "done"), ("assistant", "stopped"),   # stopped with Ctrl+C
    ("user", "done"), ("assistant", "done"),      # two lines
    ("user", "done"), ("assistant", "done"),      # typed after choosing chat 1
], rows
assert rows[3][3] and rows[5][3], "the stopped answers kept their partial text"
assert rows[6][3] == "first line\nsecond line", rows[6]
assert rows[8][3] == "picked from the list" and rows[8][0] == rows[0][0], "sent to chat 1"
EOF

echo "tmux check passed: streamed answer shown, Esc and Ctrl+C stopped answers, a"
echo "two-line message kept its lines, a chat chosen in the sidebar took the typed text,"
echo "ctrl+q quit cleanly, no process left behind, 10 messages saved where they belong."
