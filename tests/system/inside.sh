#!/bin/sh
# The system test of the Debian package, run inside a booted Debian 12 or 13 container
# by tcpmap-system-test.service (tests/test_system_deb.py sets it all up).
#
# /srv/tcpmap-test/previous/ holds the previous build of the package and
# /srv/tcpmap-test/current/ the newer one. Each check appends "ok NAME" or
# "FAIL NAME" and its output to results.txt; checks go on after a failure, so
# that one run shows them all. The last line counts them.
set -eu

T=/srv/tcpmap-test
RESULTS=$T/results.txt
DB=/var/lib/tcpmap/virtual.lmdb
SOCKETMAP=/var/spool/postfix/private/tcpmap
PREVIOUS=$(echo "$T"/previous/tcpmap-lmdb_*.deb)
CURRENT=$(echo "$T"/current/tcpmap-lmdb_*.deb)
export DEBIAN_FRONTEND=noninteractive
passed=0
failed=0

# --- helpers ----------------------------------------------------------------------

check() { # check NAME COMMAND...: run COMMAND, record its outcome under NAME
    name=$1
    shift
    if output=$("$@" 2>&1); then
        passed=$((passed + 1))
        echo "ok $name" >>"$RESULTS"
    else
        failed=$((failed + 1))
        echo "FAIL $name" >>"$RESULTS"
        printf '%s\n' "$output" | sed 's/^/    /' >>"$RESULTS"
    fi
}

expect() { # expect WANTED COMMAND...: COMMAND succeeds and prints exactly WANTED
    wanted=$1
    shift
    got=$("$@") || { echo "exit status $? from: $*"; return 1; }
    [ "$got" = "$wanted" ] || { printf 'wanted: %s\ngot:    %s\n' "$wanted" "$got"; return 1; }
}

is() { # is UNIT VERB WANTED: `systemctl VERB UNIT` prints WANTED (is-active, is-enabled)
    got=$(systemctl "$2" "$1" 2>&1) || true
    [ "$got" = "$3" ] || { echo "systemctl $2 $1: $got (wanted $3)"; return 1; }
}

lookup() { # lookup KEY TABLE: Postfix's own client (tcp:HOST:PORT, socketmap:...)
    timeout 60 postmap -c "$T/postfix" -q "$1" "$2"
}

install_deb() {
    apt-get install -y -q --no-install-recommends "$1" </dev/null
}

conffile() { # conffile PATH: dpkg lists PATH among the package's conffiles
    dpkg-query -W -f '${Conffiles}\n' tcpmap-lmdb | grep "^ $1 "
}

main_pid() {
    systemctl show -P MainPID tcpmap.service
}

dynamic_user() { # the service's process runs as a DynamicUser= (61184-65519), not root
    pid=$(main_pid)
    uid=$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status")
    echo "MainPID $pid runs as uid $uid"
    [ "$uid" -ge 61184 ] && [ "$uid" -le 65519 ]
}

runs_with() { # runs_with TEXT: the service's command line contains TEXT
    cmdline=$(tr '\0' ' ' <"/proc/$(main_pid)/cmdline")
    echo "command line: $cmdline"
    case "$cmdline" in *"$1"*) ;; *) return 1 ;; esac
}

compiled_service() { # the service's process runs every hot-path module compiled for this Python
    # HOT_PATH: what setup.py compiles; the suffix: .cpython-311-x86_64-linux-gnu.so on Debian 12.
    # shellcheck disable=SC2046 # the module names are words
    set -- $(python3 -c 'from tcpmap_lmdb.compiled import HOT_PATH; print(*HOT_PATH, "hot__mypyc")')
    suffix=$(python3 -c 'import importlib.machinery as m; print(m.EXTENSION_SUFFIXES[0])')
    maps=/proc/$(main_pid)/maps
    mapped=$(grep -o '/[^ ]*/tcpmap_lmdb/[^ ]*\.so$' "$maps" | sort -u)
    # shellcheck disable=SC2086 # one line
    echo "tcpmap.service (MainPID $(main_pid)) maps:" $mapped | tee -a "$T/versions.txt"
    for name; do
        printf '%s\n' "$mapped" | grep -qx "/usr/lib/python3/dist-packages/tcpmap_lmdb/$name$suffix" ||
            { echo "not mapped: $name$suffix"; return 1; }
    done
}

restarted() { # restarted OLD_PID: the service is active again, in another process
    pid=$(main_pid)
    echo "MainPID was $1, is $pid"
    is tcpmap.service is-active active && [ "$pid" -ne 0 ] && [ "$pid" -ne "$1" ]
}

wait_for() { # wait_for FILE: until FILE exists, at most 30 s
    i=0
    while [ ! -e "$1" ] && [ "$i" -lt 300 ]; do
        sleep 0.1
        i=$((i + 1))
    done
}

start_client() { # start_client NAME [--persistent N]: client.py looking up, in the background
    name=$1
    shift
    rm -f "$T/$name.ready" "$T/$name.stop"
    python3 "$T/client.py" --ready "$T/$name.ready" --stop "$T/$name.stop" "$@" \
        127.0.0.1 4242 alice@example.com "$ALICE" >"$T/$name.out" 2>&1 &
    client_pid=$!
    wait_for "$T/$name.ready"
}

answers_again() { # answers_again NAME: the client gets 20 more answers (at most 30 s)
    rm -f "$T/$1.ready"
    wait_for "$T/$1.ready"
    [ -e "$T/$1.ready" ] || { cat "$T/$1.out"; return 1; }
}

stored_fds() { # the number of descriptors in tcpmap.service's file descriptor store
    systemctl show -P NFileDescriptorStore tcpmap.service
}

eof_on_stop() { # a connection held across `systemctl stop tcpmap.service` sees EOF
    python3 - "$ALICE" <<'PY'
import socket, subprocess, sys
conn = socket.create_connection(("127.0.0.1", 4242), timeout=30)
conn.sendall(b"get alice@example.com\n")
reply = conn.recv(4096)
assert reply == f"200 {sys.argv[1]}\n".encode(), reply
subprocess.run(["systemctl", "stop", "tcpmap.service"], check=True)
assert conn.recv(1) == b"", "the connection stayed open after systemctl stop"
print("EOF after systemctl stop")
PY
}

stop_client() { # stop_client NAME: stop it, keep its exit status for client_ok
    touch "$T/$1.stop"
    client_status=0
    wait "$client_pid" || client_status=$?
}

client_ok() { # client_ok NAME: no refused connection, no wrong reply
    cat "$T/$1.out"
    return "$client_status"
}

journal_shows() { # journal_shows TEXT...: journalctl -u tcpmap has every TEXT (waits 10 s)
    i=0
    while :; do
        journalctl --sync 2>/dev/null || true
        log=$(journalctl -u tcpmap --no-pager -o cat)
        missing=""
        for text; do
            case "$log" in *"$text"*) ;; *) missing="$missing [$text]" ;; esac
        done
        [ -z "$missing" ] && return 0
        if [ "$i" -ge 100 ]; then
            printf 'missing:%s\njournalctl -u tcpmap:\n%s\n' "$missing" "$log"
            return 1
        fi
        sleep 0.1
        i=$((i + 1))
    done
}

no_traceback() {
    ! journalctl -u tcpmap --no-pager -o cat | grep -A20 Traceback
}

leftovers() { # nothing from dpkg -L remains, but directories other packages own too
    status=0
    while read -r path; do
        [ "$path" != /. ] || continue
        [ -e "$path" ] || [ -L "$path" ] || continue
        # Debian 13's /lib is a link to /usr/lib: its packages own the /usr path.
        if [ -d "$path" ] && { dpkg-query -S "$path" || dpkg-query -S "$(readlink -f "$path")"; } \
            >/dev/null 2>&1; then
            continue
        fi
        echo "left behind: $path"
        status=1
    done <"$T/dpkg-L.txt"
    return "$status"
}

not_listening() {
    ! ss -Hltn 'sport = :4242' | grep .
}

# --- fixtures ---------------------------------------------------------------------

: >"$RESULTS"
: >"$T/timings.txt"
# The release and the versions under test (tests/test_system_deb.py prints them).
{
    . /etc/os-release && echo "$PRETTY_NAME"
    # shellcheck disable=SC2016 # ${Package} is dpkg-query's
    dpkg-query -W -f '${Package} ${Version}\n' systemd postfix postfix-lmdb python3 \
        python3-gevent python3-lmdb python3-systemd
} >"$T/versions.txt"
ALICE=alice@example.net
# Postfix's postmap needs a main.cf; dated in the past, or Postfix waits for it to settle.
mkdir -p "$T/postfix"
printf 'compatibility_level = 3.6\nmyhostname = tcpmap-test.localdomain\n' >"$T/postfix/main.cf"
touch -d '1 hour ago' "$T/postfix/main.cf"
printf 'alice@example.com  %s\nBob@Example.COM  bob@example.net\n' "$ALICE" >"$T/virtual"

# --- install (the previous build), files, units -----------------------------------

check "install $(basename "$PREVIOUS")" install_deb "$PREVIOUS"
check "install enables tcpmap.socket" is tcpmap.socket is-enabled enabled
check "install starts tcpmap.socket" is tcpmap.socket is-active active
check "tcpmap.service is not enabled (static)" is tcpmap.service is-enabled static
check "install does not start tcpmap.service" is tcpmap.service is-active inactive
check "tcpmap-socketmap.socket is installed, not enabled" is tcpmap-socketmap.socket is-enabled disabled
check "install does not start tcpmap-socketmap.socket" is tcpmap-socketmap.socket is-active inactive
check "installed files" ls -d /usr/bin/tcpmap-build /usr/bin/tcpmap-server /usr/bin/tcpmap-query \
    /lib/systemd/system/tcpmap.socket /lib/systemd/system/tcpmap.service \
    /usr/share/man/man1/tcpmap-build.1.gz /usr/share/man/man1/tcpmap-query.1.gz \
    /usr/share/man/man8/tcpmap-server.8.gz /usr/share/doc/tcpmap-lmdb/README.md.gz \
    /usr/share/doc/tcpmap-lmdb/examples/virtual /usr/lib/python3/dist-packages/tcpmap_lmdb
check "/etc/default/tcpmap is a conffile" conffile /etc/default/tcpmap
check "state directory /var/lib/tcpmap" expect "directory 755 root" stat -c '%F %a %U' /var/lib/tcpmap

# --- build a table, first connection -------------------------------------------------

check "tcpmap-build a table into /var/lib/tcpmap" tcpmap-build -o "$DB" "$T/virtual"
check "the table is world-readable" expect 644 stat -c %a "$DB"
check "edit /etc/default/tcpmap" \
    sed -i 's/^TCPMAP_OPTIONS=.*/TCPMAP_OPTIONS=--idle-timeout 300/' /etc/default/tcpmap
check "systemctl enable --now tcpmap.socket" systemctl enable --now tcpmap.socket
check "tcpmap.service not active before the first connection" is tcpmap.service is-active inactive
check "postmap -q KEY tcp:127.0.0.1:4242 answers" expect "$ALICE" lookup alice@example.com tcp:127.0.0.1:4242
check "postmap -q KEY tcp:[::1]:4242 answers (key folded)" \
    expect bob@example.net lookup BOB@example.com 'tcp:[::1]:4242'
check "the first connection started tcpmap.service" is tcpmap.service is-active active
check "tcpmap.service runs as a dynamic user, not root" dynamic_user
check "tcpmap.service runs with the options from /etc/default/tcpmap" runs_with "--idle-timeout 300"
check "tcpmap.service runs the hot path compiled for this Python" compiled_service
check "python3 -m tcpmap_lmdb.compiled --require" python3 -m tcpmap_lmdb.compiled --require
check "tcpmap.service exposure is at most 1.0 (systemd-analyze security)" \
    systemd-analyze security --no-pager --threshold=10 tcpmap.service

# --- upgrade to the current build, with a client connecting all along ----------------

before=$(main_pid)
start_client upgrade
check "upgrade to $(basename "$CURRENT")" install_deb "$CURRENT"
stop_client upgrade
check "upgrade refuses no connection" client_ok upgrade
before=$(main_pid)
start_client upgrade-kept --persistent 8
check "reinstall $(basename "$CURRENT") (persistent connections)" \
    apt-get install -y -q --reinstall "$CURRENT" </dev/null
check "lookups go on over the same connections after the upgrade" answers_again upgrade-kept
stop_client upgrade-kept
check "an upgrade closes no persistent connection (file descriptor store)" client_ok upgrade-kept
check "the upgrade restarted tcpmap.service" restarted "$before"
# shellcheck disable=SC2016 # ${Version} is dpkg-query's, not the shell's
check "upgrade installs the new version" \
    expect "$(dpkg-deb -f "$CURRENT" Version)" dpkg-query -W -f '${Version}' tcpmap-lmdb
check "upgrade keeps the edit to /etc/default/tcpmap" \
    grep -qx 'TCPMAP_OPTIONS=--idle-timeout 300' /etc/default/tcpmap
check "upgrade keeps tcpmap.socket enabled" is tcpmap.socket is-enabled enabled
check "upgrade restarts the running tcpmap.service" restarted "$before"
check "the restarted service keeps the edited options" runs_with "--idle-timeout 300"
check "the restarted service runs the compiled hot path" compiled_service
check "tcpmap-metrics.socket is installed, not enabled" is tcpmap-metrics.socket is-enabled disabled

# --- reload, logs, restart ---------------------------------------------------------

ALICE=alice@example.org
sed "s/alice@example.net/$ALICE/" "$T/virtual" >"$T/virtual.changed"
check "tcpmap-build a changed table" tcpmap-build -o "$DB" "$T/virtual.changed"
check "systemctl reload tcpmap" systemctl reload tcpmap
check "after the reload the new value is served" expect "$ALICE" lookup alice@example.com tcp:127.0.0.1:4242
check "journalctl -u tcpmap shows the lifecycle" journal_shows \
    "inherited socket 'tcp_table' from systemd" "listening on 127.0.0.1:4242" \
    "listening on [::1]:4242" "opened $DB" "SIGHUP: re-opening $DB" \
    "stopping: closing listeners" "stopped after"

before=$(main_pid)
start_client restart
check "systemctl restart tcpmap" systemctl restart tcpmap
stop_client restart
check "systemctl restart refuses no connection" client_ok restart
check "systemctl restart started a new process" restarted "$before"

# Persistent connections, as Postfix's processes hold them, go through the file
# descriptor store: no EOF, every lookup answered, by a new process.
before=$(main_pid)
start_client kept --persistent 8
check "systemctl restart tcpmap (persistent connections)" systemctl restart tcpmap
check "lookups go on over the same connections after the restart" answers_again kept
stop_client kept
check "systemctl restart closes no persistent connection" client_ok kept
check "the restart started a new process" restarted "$before"
check "journalctl shows the connections handed over and taken back" journal_shows \
    "to systemd's file descriptor store" "from before the restart"
check "the new process emptied the file descriptor store" expect 0 stored_fds
check "systemctl stop closes a connection (EOF)" eof_on_stop
check "nothing is left in the store after systemctl stop" expect 0 stored_fds
# This test has started tcpmap.service six times in a few seconds by now; systemd's
# default start limit is 5 starts in 10 s (DefaultStartLimitBurst=), and the next
# activation would fail the socket. reset-failed also resets that count.
check "systemctl reset-failed tcpmap.service" systemctl reset-failed tcpmap.service

# --- tables that rebuild themselves: tcpmap-build@.path ----------------------------

SRC=/etc/postfix/virtual
INSTANCE=$(systemd-escape "$SRC") # as the issue writes it; the access table below uses --path
BUILD=tcpmap-build@$INSTANCE

now_ms() { echo $(($(date +%s%N) / 1000000)); }

served_within() { # served_within MS KEY WANTED: postmap -q over tcp: gives WANTED within MS
    start=$(now_ms)
    while :; do
        got=$(lookup "$2" tcp:127.0.0.1:4242 2>&1) || true
        elapsed=$(($(now_ms) - start))
        if [ "$got" = "$3" ]; then
            echo "served after $elapsed ms" | tee -a "$T/timings.txt"
            return 0
        fi
        if [ "$elapsed" -ge "$1" ]; then
            printf 'after %s ms still: %s (wanted %s)\n' "$elapsed" "$got" "$3"
            return 1
        fi
        sleep 0.05
    done
}

build_journal_shows() { # build_journal_shows TEXT: journalctl -u $BUILD has TEXT (waits 10 s)
    i=0
    while :; do
        journalctl --sync 2>/dev/null || true
        log=$(journalctl -u "$BUILD.service" --no-pager -o cat)
        case "$log" in *"$1"*) echo "$log" | grep -F "$1"; return 0 ;; esac
        if [ "$i" -ge 100 ]; then
            printf 'missing [%s] in journalctl -u %s.service:\n%s\n' "$1" "$BUILD" "$log"
            return 1
        fi
        sleep 0.1
        i=$((i + 1))
    done
}

use_output() { # the drop-in that points the instance's table at the served one
    mkdir -p "/etc/systemd/system/$BUILD.service.d"
    printf '[Service]\nEnvironment="TCPMAP_BUILD_OPTIONS=-o %s"\n' "$DB" \
        >"/etc/systemd/system/$BUILD.service.d/output.conf"
    systemctl daemon-reload
}

# systemd does not watch the path while the build runs: a save then is caught by the
# build's own before/after check, one in the few ms after it only by the next save.
build_done() { # until the instance's build has finished (inactive or failed), at most 10 s
    i=0
    until case $(systemctl is-active "$BUILD.service") in inactive | failed) ;; *) false ;; esac; do
        [ "$i" -lt 100 ] || { systemctl status --no-pager "$BUILD.service"; return 1; }
        sleep 0.1
        i=$((i + 1))
    done
}
cp "$T/virtual.changed" "$SRC"
check "the tcpmap-build@ templates are installed, not enabled" is "$BUILD.path" is-enabled disabled
check "a drop-in sets the instance's output to $DB" use_output
check "systemctl enable --now $BUILD.path" systemctl enable --now "$BUILD.path"
check "$BUILD.path is active" is "$BUILD.path" is-active active
CAROL=carol@example.org
check "edit $SRC (sed -i: a new file renamed over it)" sed -i "s/bob@example.net/$CAROL/" "$SRC"
check "the edit is rebuilt and served over tcp: within 3 s" served_within 3000 bob@example.com "$CAROL"
DAVE=dave@example.org
check "the build has finished" build_done
check "edit $SRC in place (>>)" sh -c "printf 'dave@example.com %s\n' $DAVE >>$SRC"
check "the in-place edit is rebuilt and served within 3 s" served_within 3000 dave@example.com "$DAVE"
check "the build has finished" build_done
check "a bad edit: a line without a value (line 4)" sh -c "printf 'broken-line\n' >>$SRC"
check "the bad edit logs $SRC:4: to the journal" build_journal_shows "$SRC:4:"
check "after the bad edit the live table is still served" \
    expect "$DAVE" lookup dave@example.com tcp:127.0.0.1:4242
check "after the bad edit the old value is still served" \
    expect "$CAROL" lookup bob@example.com tcp:127.0.0.1:4242
check "the failed build has finished" build_done
check "the next good save publishes" sed -i "s/^broken-line\$/erin@example.com erin@example.org/" "$SRC"
check "the good save is served within 3 s" served_within 3000 erin@example.com erin@example.org
check "$BUILD.path still watches after a failed build" is "$BUILD.path" is-active active
check "systemctl disable --now $BUILD.path" systemctl disable --now "$BUILD.path"

# Without a drop-in the table goes beside the source, as postmap does.
ACCESS=/etc/postfix/access
printf 'spammer@example.com REJECT\n' >"$ACCESS"
ACCESS_BUILD=tcpmap-build@$(systemd-escape --path "$ACCESS")
check "systemctl enable --now $ACCESS_BUILD.path" systemctl enable --now "$ACCESS_BUILD.path"
check "edit $ACCESS" sh -c "printf 'friend@example.com OK\n' >>$ACCESS"
beside() { # postmap -q reads $ACCESS.lmdb (Postfix's own reader), once the build wrote it
    i=0
    until [ "$(lookup friend@example.com "lmdb:$ACCESS" 2>&1)" = OK ]; do
        [ "$i" -lt 60 ] || { lookup friend@example.com "lmdb:$ACCESS"; return 1; }
        sleep 0.05
        i=$((i + 1))
    done
}
check "the default output is $ACCESS.lmdb, beside the source" beside
check "systemctl disable --now $ACCESS_BUILD.path" systemctl disable --now "$ACCESS_BUILD.path"

# --- hostile clients and faults, under the hardened unit -------------------------

check "hostile clients are answered right, others stay prompt (abuse.py)" \
    python3 "$T/abuse.py" "$ALICE"
check "the service survives hostile clients" is tcpmap.service is-active active

fails_temporarily() { # fails_temporarily KEY TABLE: a query error (400/TEMP), never "not found"
    if out=$(timeout 60 postmap -c "$T/postfix" -q "$1" "$2" 2>&1); then
        echo "answered: $out"
        return 1
    fi
    printf '%s\n' "$out" | grep -q "query error" || { echo "$out"; return 1; }
}

publish_garbage() { # replace the table, by rename, with random bytes (world-readable)
    head -c 65536 /dev/urandom >"$DB.garbage" && chmod 644 "$DB.garbage" && mv -f "$DB.garbage" "$DB"
}

fault_pid=$(main_pid)
check "publish a garbage table" publish_garbage
check "a garbage table answers 400 (query error), not not-found" \
    fails_temporarily alice@example.com tcp:127.0.0.1:4242
check "the service survives a garbage table" is tcpmap.service is-active active
check "delete the table" rm "$DB"
check "a deleted table answers 400 (query error)" \
    fails_temporarily alice@example.com tcp:127.0.0.1:4242
check "tcpmap-build the table again" tcpmap-build -o "$DB" "$T/virtual.changed"
check "a good table is served again, without a restart" \
    expect "$ALICE" lookup alice@example.com tcp:127.0.0.1:4242
check "the same process served through all of it" expect "$fault_pid" main_pid

# The socketmap socket for a chrooted Postfix joins the same service, once that is stopped.
check "systemctl stop tcpmap.service" systemctl stop tcpmap.service
check "systemctl enable --now tcpmap-socketmap.socket" systemctl enable --now tcpmap-socketmap.socket
check "the socketmap socket is Postfix's, mode 0660" \
    expect "socket 660 postfix postfix" stat -c '%F %a %U %G' "$SOCKETMAP"
check "postmap -q KEY socketmap:unix:...:virtual answers" \
    expect "$ALICE" lookup alice@example.com "socketmap:unix:$SOCKETMAP:virtual"
check "tcp:127.0.0.1:4242 still answers" expect "$ALICE" lookup alice@example.com tcp:127.0.0.1:4242

scraped() { # scraped LINE: a line of the metrics from tcpmap-metrics.socket (127.0.0.1:9612)
    python3 -c 'import urllib.request as u
print(u.urlopen("http://127.0.0.1:9612/metrics", timeout=30).read().decode())' | grep -qxF "$1"
}
check "systemctl stop tcpmap.service" systemctl stop tcpmap.service
check "systemctl enable --now tcpmap-metrics.socket" systemctl enable --now tcpmap-metrics.socket
check "a lookup after enabling the metrics socket" \
    expect "$ALICE" lookup alice@example.com tcp:127.0.0.1:4242
check "the metrics count that lookup" \
    scraped 'tcpmap_lookups_total{map="virtual",protocol="tcp_table",result="found"} 1.0'
check "journal entries carry SYSLOG_FACILITY=2 (mail)" \
    sh -c 'journalctl -u tcpmap -o json --no-pager | grep -q "\"SYSLOG_FACILITY\":\"2\""'
check "no traceback in journalctl -u tcpmap" no_traceback

# --- purge ------------------------------------------------------------------------

dpkg -L tcpmap-lmdb >"$T/dpkg-L.txt"
check "apt-get purge tcpmap-lmdb" apt-get purge -y -q tcpmap-lmdb </dev/null
check "purge leaves no file from dpkg -L behind" leftovers
check "purge removes /etc/default/tcpmap" test ! -e /etc/default/tcpmap
check "purge removes the socket's enable link" \
    test ! -e /etc/systemd/system/sockets.target.wants/tcpmap.socket
check "purge stops tcpmap.service" is tcpmap.service is-active inactive
check "purge stops tcpmap-socketmap.socket" is tcpmap-socketmap.socket is-active inactive
check "purge stops tcpmap-metrics.socket" is tcpmap-metrics.socket is-active inactive
check "purge removes the socketmap socket file" test ! -e "$SOCKETMAP"
check "nothing listens on port 4242 after the purge" not_listening
check "purge keeps the admin's table in /var/lib/tcpmap" test -f "$DB"

echo "result: $passed passed, $failed failed" >>"$RESULTS"
cat "$RESULTS"
[ "$failed" -eq 0 ]
