#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, so the SLURM path is tested against Slurm itself
# (make test-slurm), not a mock. For tests only: one node, no accounting database, jobs run as
# the submitting user with no cgroup confinement.
#
#   tools/slurm_local.sh up       install Slurm and munge (apt) if missing, write
#                                 /etc/slurm/slurm.conf for this host, start munged, slurmctld and
#                                 slurmd, wait until the node is idle
#   tools/slurm_local.sh down     cancel its jobs, stop the daemons by their pid files, remove the
#                                 slurm.conf it wrote (logs stay in the state folder)
#   tools/slurm_local.sh status   exit 0 if up, 3 if not
#
# Root only (it installs packages and writes /etc/slurm); needs no systemd. State (munge key and
# socket, pid files, spool, logs) lives in $MSR_SLURM_STATE (default /var/lib/msr-slurm-local),
# a root-owned 0700 folder. Daemons are stopped only through their pid files, after checking that
# the pid still runs that daemon - never by name, so no other Slurm or munge here is touched.
#
# Why the configuration is as it is (see also /work/shared/research/slurm-local.md):
# - /etc/slurm/slurm.conf, not SLURM_CONF: the SLURM executor plugin's nested `srun` drops every
#   SLURM_* variable, so only the compiled-in default path is seen by every tool.
# - DefMemPerCPU: without it a job that asks for no memory is given the whole node, and jobs run
#   one at a time.
# - MinJobAge=300: the plugin's `--slurm-status-command squeue` (the only status command without
#   an accounting database) needs finished jobs kept in slurmctld for >= 3x its first check interval.
# - proctrack/linuxproc, task/none: no cgroups, which containers often do not delegate.
set -euo pipefail
umask 077

STATE=${MSR_SLURM_STATE:-/var/lib/msr-slurm-local}
CONF=/etc/slurm/slurm.conf
MARKER="# written by msr tools/slurm_local.sh - removed by 'tools/slurm_local.sh down'"
PACKAGES=(slurmctld slurmd slurm-client munge)

usage() {
    echo "usage: $0 up|down|status" >&2
    echo "  up      install (apt) and start a one-node Slurm cluster on this machine (root)" >&2
    echo "  down    stop it by its pid files" >&2
    echo "  status  exit 0 if it is up, 3 if not" >&2
    exit 2
}

die() { echo "slurm_local: error: $*" >&2; exit 1; }
say() { echo "slurm_local: $*" >&2; }

# ------------------------------------------------------------------------------ the state folder
check_state_path() {
    # its path goes into slurm.conf, where whitespace or '#' would silently break a line
    [[ "$STATE" =~ ^/[A-Za-z0-9._/-]+$ ]] || die "MSR_SLURM_STATE=$STATE: expected an absolute path of letters, digits, '.', '_', '-', '/'"
}

# The folder holds the munge key: it must be ours alone. A folder someone else created (or a
# symlink planted in its place) is refused rather than used.
make_state_dir() {
    check_state_path
    if [ -L "$STATE" ]; then die "$STATE is a symlink; refusing to use it as the state folder"; fi
    if [ ! -e "$STATE" ]; then
        mkdir -p -m 0755 "$(dirname "$STATE")"
        mkdir -m 0700 "$STATE"
    fi
    [ -d "$STATE" ] || die "$STATE exists and is not a folder"
    [ "$(stat -c %u "$STATE")" = 0 ] || die "$STATE is not owned by root; refusing to use it"
    chmod 0700 "$STATE"
}

# ------------------------------------------------------------------------------------ daemons
pidfile() { echo "$STATE/run/$1.pid"; }

# The pid in the daemon's pid file, if that process is alive and still is that daemon (a pid
# file left by a crash may name a pid the kernel has since given to something else).
live_pid() {
    local name=$1 file pid comm
    file=$(pidfile "$name")
    [ -f "$file" ] || return 1
    pid=$(tr -d '[:space:]' < "$file")
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [ "$comm" = "$name" ] || return 1
    echo "$pid"
}

stop_daemon() {
    local name=$1 pid i
    if pid=$(live_pid "$name"); then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 50); do
            [ -e "/proc/$pid" ] || break
            sleep 0.2
        done
        if [ -e "/proc/$pid" ]; then
            say "$name (pid $pid) did not stop in 10 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        say "stopped $name (pid $pid)"
    fi
    rm -f "$(pidfile "$name")"
}

running_daemons() {
    local name
    for name in munged slurmctld slurmd; do
        if live_pid "$name" >/dev/null; then echo "$name"; fi
    done
}

# ---------------------------------------------------------------------------------- install
install_packages() {
    local missing=() tool
    for tool in slurmctld slurmd sbatch munged; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install ${PACKAGES[*]}"
    say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    local log start=$SECONDS added_policy=0
    log=$(mktemp)
    # Package scripts would start the daemons through init scripts with the packaged defaults;
    # we start our own. policy-rc.d (exit 101 = "do not start") is the Debian way to say so; one
    # already present is left alone.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\n# temporary, from msr tools/slurm_local.sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        added_policy=1
    fi
    local ok=0
    # a stale package list is the usual reason for a failed install: update once and retry
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            -o DPkg::Lock::Timeout=300 "${PACKAGES[@]}" >"$log" 2>&1; then
        ok=1
    elif apt-get update -q -o DPkg::Lock::Timeout=300 >>"$log" 2>&1 && \
         DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            -o DPkg::Lock::Timeout=300 "${PACKAGES[@]}" >>"$log" 2>&1; then
        ok=1
    fi
    if [ "$added_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    if [ "$ok" != 1 ]; then
        tail -n 20 "$log" >&2
        rm -f "$log"
        die "apt-get could not install ${PACKAGES[*]} (last lines above)"
    fi
    rm -f "$log"
    say "installed ${PACKAGES[*]} in $((SECONDS - start)) s"
}

# ------------------------------------------------------------------------------- slurm.conf
conf_is_ours() { [ -f "$CONF" ] && [ "$(head -n 1 "$CONF")" = "$MARKER" ]; }

# This machine as one node: CPU layout and memory as slurmd itself measures them (`slurmd -C`),
# memory capped by the container's cgroup limit if it has one.
write_conf() {
    local host node cpus boards sockets cores threads mem limit defmem
    host=$(hostname -s)
    [[ "$host" =~ ^[A-Za-z0-9][A-Za-z0-9-]*$ ]] || die "hostname '$host' cannot be a Slurm node name"
    node=$(slurmd -C | head -n 1)
    field() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$node"; }
    cpus=$(field CPUs); boards=$(field Boards); sockets=$(field SocketsPerBoard)
    cores=$(field CoresPerSocket); threads=$(field ThreadsPerCore); mem=$(field RealMemory)
    for v in cpus boards sockets cores threads mem; do
        [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "could not read $v from 'slurmd -C': $node"
    done
    if [ -r /sys/fs/cgroup/memory.max ]; then
        limit=$(cat /sys/fs/cgroup/memory.max)
        if [[ "$limit" =~ ^[0-9]+$ ]] && [ $((limit / 1048576)) -lt "$mem" ]; then mem=$((limit / 1048576)); fi
    fi
    # an equal share of memory per CPU: a job that asks for nothing gets its CPUs' share, not the node
    defmem=$((mem / cpus))

    if [ -e "$CONF" ] && ! conf_is_ours; then
        die "$CONF exists and was not written by this script; move it away to use a local test cluster"
    fi
    mkdir -p -m 0755 /etc/slurm
    local tmp
    tmp=$(mktemp /etc/slurm/.slurm.conf.XXXXXX)
    cat > "$tmp" <<EOF
$MARKER
ClusterName=msrlocal
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket.2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=300
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus Boards=$boards SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=$defmem
EOF
    chmod 0644 "$tmp"
    mv -f "$tmp" "$CONF"
    say "wrote $CONF: node $host, $cpus CPUs, ${mem} MB, DefMemPerCPU=$defmem"
}

# ------------------------------------------------------------------------------------ commands
print_logs() {
    local f
    for f in munged slurmctld slurmd; do
        if [ -f "$STATE/log/$f.log" ]; then
            echo "--- last lines of $STATE/log/$f.log" >&2
            tail -n 15 "$STATE/log/$f.log" >&2
        fi
    done
}

cmd_up() {
    [ "$(id -u)" = 0 ] || die "needs root (it installs packages, writes $CONF and starts daemons as root)"
    make_state_dir
    exec 9>"$STATE/lock"
    flock -n 9 || die "another tools/slurm_local.sh is working on $STATE"

    local running
    running=$(running_daemons | tr '\n' ' ')
    if [ "$running" = "munged slurmctld slurmd " ] && conf_is_ours && scontrol ping >/dev/null 2>&1; then
        say "already up (state in $STATE)"
        return 0
    fi
    if [ -n "$running" ]; then
        die "partly up (running: $running); run '$0 down' first"
    fi

    install_packages
    local start=$SECONDS
    # a fresh cluster every time: no jobs or node state from an earlier one
    rm -rf "$STATE/ctld" "$STATE/spool" "$STATE/run" "$STATE/munge" "$STATE/log"
    mkdir -m 0700 "$STATE/ctld" "$STATE/spool" "$STATE/run" "$STATE/munge" "$STATE/log"
    write_conf
    # from here on, a failure stops whatever was started
    trap 'status=$?; if [ $status -ne 0 ]; then print_logs; stop_all >/dev/null 2>&1 || true; fi' EXIT

    mungekey --create --keyfile="$STATE/munge/munge.key" 2>/dev/null || \
        dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
    chmod 0400 "$STATE/munge/munge.key"
    # The daemons must not inherit fd 9 (the lock on the state folder), or they would hold it
    # for as long as they run. --force: munged refuses socket folders it did not expect; this
    # one is root's and 0700.
    munged 9>&- --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket.2" \
        --pid-file="$(pidfile munged)" --log-file="$STATE/log/munged.log" \
        --seed-file="$STATE/munge/munged.seed" \
        || die "munged did not start"
    wait_for "munged's socket" 10 test -S "$STATE/munge/munge.socket.2"
    slurmctld 9>&- || die "slurmctld did not start"
    wait_for "slurmctld" 20 scontrol ping
    slurmd 9>&- || die "slurmd did not start"
    local state
    for _ in $(seq 1 60); do
        state=$(sinfo -h -N -o %T 2>/dev/null | head -n 1)
        case "$state" in
            idle) break ;;
            drain*|down*|fail*)
                sinfo -R >&2 || true
                die "the node is $state (reason above)" ;;
        esac
        sleep 0.5
    done
    [ "$state" = idle ] || die "the node is not idle after 30 s (state: ${state:-none})"
    trap - EXIT
    say "up in $((SECONDS - start)) s: $(sinfo -h -o '%P %D node(s) %c CPUs %m MB %T')"
}

wait_for() {
    local what=$1 seconds=$2 i
    shift 2
    for i in $(seq 1 $((seconds * 5))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    die "$what not ready after $seconds s"
}

# Cancel every job first: slurmstepd processes of running jobs outlive slurmd otherwise.
stop_all() {
    if live_pid slurmctld >/dev/null; then
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
        if [ -n "${jobs// /}" ]; then
            say "cancelling jobs: $jobs"
            # shellcheck disable=SC2086  # job ids are digits
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 1 30); do
                [ -z "$(squeue -h -t running,completing -o %A 2>/dev/null)" ] && break
                sleep 0.5
            done
        fi
    fi
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon munged
    if conf_is_ours; then rm -f "$CONF"; fi
}

cmd_down() {
    [ "$(id -u)" = 0 ] || die "needs root"
    check_state_path
    if [ ! -d "$STATE" ]; then
        say "not up (no state folder $STATE)"
        return 0
    fi
    make_state_dir
    exec 9>"$STATE/lock"
    flock -w 60 9 || die "another tools/slurm_local.sh is still working on $STATE"
    if [ -z "$(running_daemons)" ] && ! conf_is_ours; then
        say "not up"
        return 0
    fi
    stop_all
    say "down (logs kept in $STATE/log)"
}

cmd_status() {
    check_state_path
    local running
    running=$(running_daemons 2>/dev/null | tr '\n' ' ')
    if [ "$running" = "munged slurmctld slurmd " ] && scontrol ping >/dev/null 2>&1; then
        echo "up: $(sinfo -h -o '%P %D node(s) %c CPUs %m MB %T') (state in $STATE)"
        return 0
    fi
    echo "not up${running:+ (running: $running)}"
    return 3
}

[ $# -eq 1 ] || usage
case "$1" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) usage ;;
esac
