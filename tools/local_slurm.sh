#!/usr/bin/env bash
# local_slurm.sh -- a real SLURM cluster (with accounting) for tests: one node, or
# several nodes in network namespaces of this machine (--nodes N).
#
# Usage: bash tools/local_slurm.sh start|stop|status [--nodes N] [DIR]
#
#   DIR defaults to ${SELFTRAIN_SLURM_DIR:-/tmp/selftrain-slurm}. Everything the
#   cluster writes (configs, state, spool, logs, pid files, the MariaDB datadir)
#   lives under DIR, so several checkouts can keep separate clusters (with
#   different ports, see below) and `rm -rf DIR` after `stop` resets everything.
#
#   start   Installs missing Debian packages (apt-get), then brings up munged (only
#           if no munged answers yet), a private MariaDB, slurmdbd, slurmctld and
#           slurmd, and waits until the node is idle. Idempotent: daemons that are
#           already running are left alone; if slurm.conf changed (e.g. another
#           SELFTRAIN_SLURM_MAX_ARRAY_SIZE) slurmctld and slurmd are restarted
#           (jobs survive). Progress goes to stderr; the only line on
#           stdout is `export SLURM_CONF=DIR/etc/slurm.conf`, so
#               eval "$(bash tools/local_slurm.sh start)"
#           sets up the calling shell for sbatch/squeue/sacct/scontrol.
#   stop    Cancels the cluster's jobs (so no slurmstepd outlives it), then stops
#           the daemons this script started, by the pids in DIR/run, and waits
#           until they are gone. Nothing is killed by name.
#   status  Says for each daemon whether it runs, then prints `sinfo`.
#           Exit 0 if everything is up, 3 if not.
#
# Several nodes (--nodes N, 2 to 9): each node is a network namespace with its
# own address on a private bridge, its own host name and its own /etc/hosts
# (bind-mounted in a mount namespace of its slurmd, which its jobs inherit):
#
#     this machine's namespace  bridge NAME-br   NET.1       slurmctld, slurmdbd
#     netns NAME-n1             eth0             NET.2       slurmd n1, host name n1
#     netns NAME-n2             eth0             NET.3       slurmd n2, host name n2 ...
#
#   A node's own name resolves to its bridge address, so gloo, vLLM and
#   `hostname -i` pick it; nodes reach each other and the controller over the
#   bridge, and nothing else (no route out, and this machine's 127.0.0.1 is not
#   theirs: a server of this namespace that jobs use must listen on NET.1 or
#   0.0.0.0). The partition
#   schedules on the least loaded node (LLN), so small jobs spread over the
#   nodes. DIR defaults to ${SELFTRAIN_SLURM_DIR:-/tmp/selftrain-slurm}-Nn and
#   every port is the single-node one + 10, so both clusters can run at once;
#   munged is shared. `stop` also removes the namespaces and the bridge (after
#   killing whatever still runs in them). DIR remembers N: `stop DIR` and
#   `status DIR` need no --nodes.
#
# Exit codes: 0 ok, 1 failure, 2 this machine cannot run it (not root, no
# Debian/apt, packages not installable) -- callers skip their tests on 2,
# 3 (status only) not running, 4 (--nodes N > 1) no network namespaces or
# bridges here (no CAP_NET_ADMIN / CAP_SYS_ADMIN), 64 usage error.
#
# Environment (all optional):
#   SELFTRAIN_SLURM_DIR             default DIR
#   SELFTRAIN_SLURM_MAX_ARRAY_SIZE  MaxArraySize (default 10001; tests may lower
#                                   it, e.g. to 5, to exercise array splitting)
#   SELFTRAIN_SLURM_CLUSTER         ClusterName (default selftrain; with --nodes N
#                                   its value + "Nn", e.g. selftrain2n)
#   SELFTRAIN_SLURMCTLD_PORT        default 16817
#   SELFTRAIN_SLURMD_PORT           default 16818
#   SELFTRAIN_SLURMDBD_PORT         default 16819
#   SELFTRAIN_SLURM_MYSQL_PORT      default 13306
#   SELFTRAIN_SLURM_START_TIMEOUT   seconds to wait for an idle node (default 60)
#   SELFTRAIN_SLURM_NET             --nodes N > 1: the bridge's /24, first three
#                                   octets (default 10.77.0)
#   SELFTRAIN_SLURM_NETNS           --nodes N > 1: stem of the namespace, bridge
#                                   and veth names (default selftrain, <= 11 chars)
#
# Written for Debian 12 (slurm-wlm 22.05, munge 0.5.15, MariaDB 10.11) running
# as root without systemd and without cgroups (containers, micro-VMs).

set -euo pipefail

# ---------------------------------------------------------------- arguments --
usage() {
    echo "usage: bash ${0##*/} start|stop|status [--nodes N] [DIR]" >&2
    exit 64
}
if [ "$#" -lt 1 ]; then usage; fi
ACTION="$1"
shift
case "$ACTION" in start | stop | status) ;; *) usage ;; esac
NODES=""
DIR=""
while [ "$#" -gt 0 ]; do
    case "$1" in
    --nodes)
        [ "$#" -ge 2 ] || usage
        NODES="$2"
        shift 2
        ;;
    --nodes=*)
        NODES="${1#--nodes=}"
        shift
        ;;
    -*) usage ;;
    *)
        [ -z "$DIR" ] || usage
        DIR="$1"
        shift
        ;;
    esac
done
case "${NODES:-1}" in [1-9]) ;; *) usage ;; esac

if [ -z "$DIR" ]; then
    DIR="${SELFTRAIN_SLURM_DIR:-/tmp/selftrain-slurm}"
    if [ "${NODES:-1}" != 1 ]; then DIR="${DIR%/}-${NODES}n"; fi
fi
# Absolute path: it ends up in slurm.conf and in the export line, both of
# which are used from other working directories.
case "$DIR" in /*) ;; *) DIR="$PWD/$DIR" ;; esac
DIR="${DIR%/}"
# A DIR started with --nodes N remembers N for a later stop/status without it.
if [ -z "$NODES" ]; then
    NODES="$(cat "$DIR/etc/nodes" 2>/dev/null || echo 1)"
    case "$NODES" in [1-9]) ;; *) NODES=1 ;; esac
fi

CTLD_PORT="${SELFTRAIN_SLURMCTLD_PORT:-16817}"
SLURMD_PORT="${SELFTRAIN_SLURMD_PORT:-16818}"
DBD_PORT="${SELFTRAIN_SLURMDBD_PORT:-16819}"
MYSQL_PORT="${SELFTRAIN_SLURM_MYSQL_PORT:-13306}"
MAX_ARRAY_SIZE="${SELFTRAIN_SLURM_MAX_ARRAY_SIZE:-10001}"
CLUSTER="${SELFTRAIN_SLURM_CLUSTER:-selftrain}"
START_TIMEOUT="${SELFTRAIN_SLURM_START_TIMEOUT:-60}"

# ------------------------------------------------ several nodes (--nodes N) --
MULTI=0
NODE_NAMES=()
if [ "$NODES" != 1 ]; then
    MULTI=1
    # Ports of their own, so that this cluster and the single-node one can run at once.
    CTLD_PORT=$((CTLD_PORT + 10))
    SLURMD_PORT=$((SLURMD_PORT + 10))
    DBD_PORT=$((DBD_PORT + 10))
    MYSQL_PORT=$((MYSQL_PORT + 10))
    CLUSTER="${CLUSTER}${NODES}n"
    NET="${SELFTRAIN_SLURM_NET:-10.77.0}"
    STEM="${SELFTRAIN_SLURM_NETNS:-selftrain}"
    case "$NET" in *[!0-9.]* | *.*.*.* | .* | *.) usage ;; *.*.*) ;; *) usage ;; esac
    # Interface names have at most 15 characters: "$STEM-br", "$STEM-v9".
    if [ "${#STEM}" -gt 11 ] || [ -z "$STEM" ]; then usage; fi
    CTLD_ADDR="$NET.1"
    BRIDGE="$STEM-br"
    for ((i = 1; i <= NODES; i++)); do NODE_NAMES+=("n$i"); done
fi
node_addr() { echo "$NET.$((${1#n} + 1))"; } # n1 -> NET.2
node_ns() { echo "$STEM-$1"; }                # network namespace of a node
node_veth() { echo "$STEM-v${1#n}"; }         # its veth's end on the bridge
NS_IF=eth0                                    # the node's end, the same name on every node

ETC="$DIR/etc"
RUN="$DIR/run"
LOG="$DIR/log"
SLURM_CONF_FILE="$ETC/slurm.conf"
DBD_CONF_FILE="$ETC/slurmdbd.conf"
DB_PASS_FILE="$ETC/db.pass"
MYSQL_DATA="$DIR/mysql/data"
MYSQL_SOCK="$DIR/mysql/mysqld.sock"
DB_NAME="slurm_acct_db"
DB_USER="slurm"

# Debian package names; slurm-client brings sinfo/sbatch/sacct/sacctmgr,
# mariadb-server brings mariadbd, mariadb-install-db and the mariadb client.
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd slurm-wlm-basic-plugins
    slurm-wlm-mysql-plugin mariadb-server)
# Several nodes: `ip` (netns, veth, bridge); nsenter/unshare come with util-linux.
if [ "$MULTI" = 1 ]; then PACKAGES+=(iproute2); fi

log() { echo "local_slurm: $*" >&2; }
# Daemons started by this invocation of `start` (pid file, name); a failed
# start stops them again so that a caller that gets exit 1 has nothing to
# clean up (logs stay in DIR/log).
STARTED=()
die() {
    log "ERROR: $*"
    undo_start
    exit 1
}
NET_CREATED=0
undo_start() {
    local i
    for ((i = ${#STARTED[@]} - 2; i >= 0; i -= 2)); do
        stop_pidfile "${STARTED[i]}" "${STARTED[i + 1]}"
    done
    STARTED=()
    if [ "$NET_CREATED" = 1 ]; then
        NET_CREATED=0
        kill_in_namespaces
        net_down
    fi
}
# One line (on stderr, like all messages: stdout is kept for the export line
# that callers eval) and exit 2: "this machine cannot do it", callers skip.
unsupported() {
    echo "local_slurm: cannot run a local SLURM cluster here: $*" >&2
    exit 2
}
# Exit 4: several nodes need network namespaces and a bridge, which this
# machine (a container without CAP_NET_ADMIN, say) does not allow.
no_namespaces() {
    echo "local_slurm: cannot run a SLURM cluster of $NODES nodes here: $* (network namespaces and a bridge need root with CAP_NET_ADMIN and CAP_SYS_ADMIN)" >&2
    undo_start
    exit 4
}

# ------------------------------------------------------------ preconditions --
# The daemons need root (slurmd runs jobs as their users, munged's key lives in
# /etc) and the packages come from apt, so anything else is "skip".
[ "$(id -u)" = 0 ] || unsupported "not running as root"
[ -r /etc/debian_version ] || unsupported "not a Debian system (/etc/debian_version missing)"
command -v apt-get >/dev/null 2>&1 || unsupported "apt-get not found"
command -v dpkg-query >/dev/null 2>&1 || unsupported "dpkg-query not found"

# Clients and daemons started below read the config from here.
export SLURM_CONF="$SLURM_CONF_FILE"

# ----------------------------------------------------------- process helpers --
# pid_alive PIDFILE NAME: true if PIDFILE names a live process called NAME.
# Checking the name guards against a recycled pid after a reboot/crash, so that
# `stop` never signals an unrelated process.
pid_alive() {
    local pidfile="$1" name="$2" pid comm
    [ -s "$pidfile" ] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [ -n "$pid" ] || return 1
    [ -r "/proc/$pid/comm" ] || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    [ "$comm" = "$name" ] || return 1
    # A zombie is dead: here PID 1 reaps orphans only every now and then.
    ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}

pid_of() { tr -dc '0-9' <"$1"; }

# stop_pidfile PIDFILE NAME: SIGTERM, wait up to 30 s, then SIGKILL.
stop_pidfile() {
    local pidfile="$1" name="$2" pid i
    if ! pid_alive "$pidfile" "$name"; then
        rm -f "$pidfile"
        return 0
    fi
    pid="$(pid_of "$pidfile")"
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do
        [ -d "/proc/$pid" ] || break
        # A zombie would keep /proc/PID; it is gone for our purposes.
        if grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null; then break; fi
        sleep 0.1
    done
    if [ -d "/proc/$pid" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null; then
        log "$name (pid $pid) ignored SIGTERM for 30 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$pidfile"
}

# wait_pidfile PIDFILE NAME SECONDS LOGFILE: wait for a daemon that forks
# itself into the background to write its pid file.
wait_pidfile() {
    local pidfile="$1" name="$2" secs="$3" logfile="$4" i
    for ((i = 0; i < secs * 10; i++)); do
        pid_alive "$pidfile" "$name" && return 0
        sleep 0.1
    done
    log "$name did not come up; last lines of $logfile:"
    tail -n 30 "$logfile" >&2 2>/dev/null || true
    die "$name did not come up"
}

# port_busy PORT: true if something accepts connections on 127.0.0.1:PORT.
# Checked before starting each daemon, so that a collision (another cluster
# with the same ports, some other service) fails at once with a clear message
# instead of a daemon dying in the background and a timeout.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# check_ports: every daemon of ours that is not running needs its port free.
check_ports() {
    local name port var
    while read -r name port var; do
        [ -n "$name" ] || continue
        pid_alive "$RUN/$name.pid" "$name" && continue
        if port_busy "$port"; then
            die "port $port for $name is in use by another process; choose another with $var=PORT"
        fi
    done <<EOF
mariadbd $MYSQL_PORT SELFTRAIN_SLURM_MYSQL_PORT
slurmdbd $DBD_PORT SELFTRAIN_SLURMDBD_PORT
slurmctld $CTLD_PORT SELFTRAIN_SLURMCTLD_PORT
$([ "$MULTI" = 1 ] || echo "slurmd $SLURMD_PORT SELFTRAIN_SLURMD_PORT")
EOF
}

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

# ---------------------------------------------------------------- packages --
missing_packages() {
    local p
    for p in "${PACKAGES[@]}"; do
        if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
            echo "$p"
        fi
    done
}

CREATED_POLICY_RC=0
cleanup() {
    # Only remove the policy-rc.d we created; a pre-existing one (Docker images
    # ship one) belongs to the machine.
    if [ "$CREATED_POLICY_RC" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
}
trap cleanup EXIT

install_packages() {
    local missing
    missing="$(missing_packages)"
    [ -z "$missing" ] && return 0
    # shellcheck disable=SC2086 # word splitting of the package list is wanted
    log "installing missing packages:" $missing
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        # Exit 101 = "action forbidden": invoke-rc.d in the maintainer scripts
        # then does not try to start munge/mariadb/slurm* (no init system here,
        # and we start our own instances with our own configs anyway).
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        CREATED_POLICY_RC=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Lists are refreshed only when something is missing: keeps `start` fast
    # and offline-capable once the packages are present.
    apt-get -o DPkg::Lock::Timeout=300 update -q >&2 ||
        unsupported "apt-get update failed (no package registry reachable?)"
    # shellcheck disable=SC2086
    apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends $missing >&2 ||
        unsupported "apt-get install of the SLURM/munge/MariaDB packages failed"
    cleanup
    CREATED_POLICY_RC=0
    missing="$(missing_packages)"
    # shellcheck disable=SC2086
    [ -z "$missing" ] || unsupported "packages still missing after apt-get install:" $missing
}

# ------------------------------------------------------------------- munge --
start_munge() {
    # munged is machine-wide (clients and slurm talk to the default socket
    # /run/munge/munge.socket.2), so an already running one -- ours from another
    # DIR or the system's -- is used as is, and not stopped by our `stop`.
    if pid_alive "$RUN/munged.pid" munged && munge_works; then return 0; fi
    rm -f "$RUN/munged.pid"
    if munge_works; then
        log "munged already running (not started by this script); using it"
        return 0
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        install -d -o munge -g munge -m 0700 /etc/munge
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile=/etc/munge/munge.key --force >&2
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    # /run is a tmpfs here and nothing (no systemd-tmpfiles) recreates it.
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    # A socket/pid left by a dead munged makes the new one refuse to start.
    rm -f /run/munge/munged.pid
    # munged must run as the key's owner; it daemonizes itself and writes its
    # pid into /run/munge (the only place the munge user may write), which we
    # copy into DIR/run to remember that we started it. --force: take over a
    # socket left behind by a munged that died (we checked none answers).
    runuser -u munge -- /usr/sbin/munged --force 9>&- </dev/null >>"$LOG/munged.out" 2>&1 ||
        { tail -n 20 "$LOG/munged.out" /var/log/munge/munged.log >&2 2>/dev/null || true; die "munged failed to start"; }
    local i
    for ((i = 0; i < 100; i++)); do
        if munge_works && [ -s /run/munge/munged.pid ]; then break; fi
        sleep 0.1
    done
    munge_works || die "munged started but munge -n | unmunge fails (see /var/log/munge/munged.log)"
    cp /run/munge/munged.pid "$RUN/munged.pid"
    STARTED+=("$RUN/munged.pid" munged)
    log "started munged (pid $(pid_of "$RUN/munged.pid"))"
}

# ----------------------------------------------------------------- MariaDB --
# A throwaway test database: trade durability against an OS crash for speed
# (slurmdbd creates dozens of tables on first start, each DDL an fsync; this
# roughly halves a clean start on a busy machine). A killed mariadbd loses
# nothing, the data is in the page cache.
MYSQL_FAST=(--innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0 --innodb-flush-method=nosync)

mysql_root() { mariadb --no-defaults --protocol=socket --socket="$MYSQL_SOCK" -uroot "$@"; }

start_mariadb() {
    if pid_alive "$RUN/mariadbd.pid" mariadbd; then return 0; fi
    rm -f "$RUN/mariadbd.pid" "$MYSQL_SOCK"
    if [ ! -d "$MYSQL_DATA/mysql" ]; then
        log "initializing MariaDB datadir $MYSQL_DATA"
        rm -rf "$MYSQL_DATA"
        mkdir -p "$MYSQL_DATA"
        # --no-defaults: ignore /etc/mysql/* (the system instance's settings).
        # root@localhost authenticates by unix socket: no root password to keep.
        mariadb-install-db --no-defaults --datadir="$MYSQL_DATA" --user=root \
            --auth-root-authentication-method=socket --skip-test-db "${MYSQL_FAST[@]}" \
            >"$LOG/mariadb-install-db.log" 2>&1 ||
            { tail -n 30 "$LOG/mariadb-install-db.log" >&2; die "mariadb-install-db failed"; }
    fi
    # Own port/socket/datadir, loopback only; --user=root because mariadbd
    # refuses to run as root otherwise and the datadir is root's. The InnoDB
    # settings are the ones slurmdbd 22.05 warns about ("Database settings not
    # recommended values") below half of its recommendation (1 GiB pool, 900 s);
    # the pool is allocated lazily, so 512M costs little resident memory.
    setsid /usr/sbin/mariadbd --no-defaults --user=root \
        --datadir="$MYSQL_DATA" --socket="$MYSQL_SOCK" \
        --port="$MYSQL_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --pid-file="$RUN/mariadbd.pid" --log-error="$LOG/mariadbd.log" \
        --innodb-buffer-pool-size=512M --innodb-lock-wait-timeout=900 \
        "${MYSQL_FAST[@]}" \
        9>&- </dev/null >>"$LOG/mariadbd.out" 2>&1 &
    # mariadbd does not fork: $! is its pid (setsid only forks when called
    # as a process group leader, which a background job of a script is not).
    local i mpid="$!"
    for ((i = 0; i < 300; i++)); do
        if pid_alive "$RUN/mariadbd.pid" mariadbd && mysql_root -e 'SELECT 1' >/dev/null 2>&1; then
            break
        fi
        kill -0 "$mpid" 2>/dev/null || break # died: no point in waiting
        sleep 0.1
    done
    mysql_root -e 'SELECT 1' >/dev/null 2>&1 ||
        { tail -n 30 "$LOG/mariadbd.log" >&2 2>/dev/null || true; die "MariaDB did not come up"; }
    STARTED+=("$RUN/mariadbd.pid" mariadbd)
    log "started mariadbd (pid $(pid_of "$RUN/mariadbd.pid"), 127.0.0.1:$MYSQL_PORT)"
}

setup_database() {
    local pass
    pass="$(cat "$DB_PASS_FILE")"
    # Idempotent; ALTER USER re-syncs the password if db.pass was regenerated.
    # slurmdbd connects over TCP to 127.0.0.1 (a "localhost" StorageHost would
    # make libmariadb use the system's default socket, not ours).
    mysql_root <<SQL
CREATE DATABASE IF NOT EXISTS \`$DB_NAME\`;
CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$pass';
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$pass';
ALTER USER '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL ON \`$DB_NAME\`.* TO '$DB_USER'@'127.0.0.1';
GRANT ALL ON \`$DB_NAME\`.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
SQL
}

# ----------------------------------------------------------------- configs --
# write_if_changed FILE MODE: stdin -> FILE, only when the content differs.
# Returns 0 if the file changed, 1 if not.
write_if_changed() {
    local file="$1" mode="$2" tmp
    tmp="$(mktemp "$file.XXXXXX")"
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [ -f "$file" ] && cmp -s "$tmp" "$file"; then
        rm -f "$tmp"
        return 1
    fi
    mv -f "$tmp" "$file"
    return 0
}

SLURM_CONF_CHANGED=0
write_configs() {
    local host topo ctld_addr slurmd_spool slurmd_pid slurmd_log nodes n
    # slurmd identifies its node by the short host name; use the same name
    # everywhere (and pass it to slurmd with -N) so they always agree.
    host="$(hostname -s)"
    # `slurmd -C` prints "NodeName=h CPUs=.. Boards=.. SocketsPerBoard=..
    # CoresPerSocket=.. ThreadsPerCore=.. RealMemory=.." then "UpTime=..".
    # Using its numbers avoids "Node configuration differs from hardware".
    topo="$(slurmd -C 2>/dev/null | awk 'NR == 1 { $1 = ""; sub(/^ /, ""); print }')"
    case "$topo" in *CPUs=*RealMemory=*) ;; *) die "unexpected output of 'slurmd -C': $topo" ;; esac

    if [ ! -s "$DB_PASS_FILE" ]; then
        (umask 077 && head -c 24 /dev/urandom | base64 | tr -d '/+=\n' >"$DB_PASS_FILE")
    fi
    chmod 0600 "$DB_PASS_FILE"

    # One node: everything on loopback. Several: the controller (and slurmdbd,
    # for sacct inside jobs) on the bridge; per-node slurmd files (%n: node
    # name); each node's own line with its address (they are all this
    # machine, so `slurmd -C`'s topology fits each); LLN: a job goes to the
    # least loaded node, so that an array of small tasks spreads over the nodes.
    if [ "$MULTI" = 1 ]; then
        ctld_addr="$CTLD_ADDR"
        slurmd_spool="$DIR/spool/%n" slurmd_pid="$RUN/slurmd-%n.pid" slurmd_log="$LOG/slurmd-%n.log"
        nodes="$(for n in "${NODE_NAMES[@]}"; do echo "NodeName=$n NodeAddr=$(node_addr "$n") $topo State=UNKNOWN"; done)
PartitionName=debug Nodes=$(IFS=,; echo "${NODE_NAMES[*]}") Default=YES MaxTime=INFINITE State=UP LLN=YES"
    else
        ctld_addr=127.0.0.1
        slurmd_spool="$DIR/spool/slurmd" slurmd_pid="$RUN/slurmd.pid" slurmd_log="$LOG/slurmd.log"
        nodes="NodeName=$host NodeAddr=127.0.0.1 $topo State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP"
    fi

    # Settings, and why:
    # - proctrack/linuxproc, task/none: no cgroups (and no systemd) here.
    # - SchedulerParameters: the default batch_sched_delay makes each job wait
    #   ~3 s, and the default sched_interval left requeued jobs pending ~1 min.
    # - AuthInfo=cred_expire=5: the default 120 s holds a requeued job back for
    #   2 minutes (the "cred_expire" option of AuthInfo exists in 22.05).
    # - EnforcePartLimits=ALL: an impossible request is rejected at submit
    #   instead of pending forever.
    # - No GresTypes: --gres=gpu:1 / --gpus=1 are rejected at submit.
    # - ReturnToService=2: a node that was DOWN (e.g. slurmd restarted) comes
    #   back by itself when slurmd registers with a valid configuration.
    # - JobRequeue=1: batch jobs may be requeued (scontrol requeue, preemption).
    # - MinJobAge=300: finished jobs stay visible in squeue/scontrol for 5 min;
    #   sacct keeps them forever.
    # - KillWait=5: time between SIGTERM and SIGKILL on cancel/timeout.
    # - MailProg=/bin/true: Debian has no /bin/mail; avoids log noise.
    if write_if_changed "$SLURM_CONF_FILE" 0644 <<EOF; then SLURM_CONF_CHANGED=1; fi
# Generated by tools/local_slurm.sh -- edits are overwritten on the next start.
ClusterName=$CLUSTER
SlurmctldHost=$host($ctld_addr)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
StateSaveLocation=$DIR/state/slurmctld
SlurmdSpoolDir=$slurmd_spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$slurmd_pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$slurmd_log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
EnforcePartLimits=ALL
MaxArraySize=$MAX_ARRAY_SIZE
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmctldTimeout=120
SlurmdTimeout=300
MailProg=/bin/true
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$ctld_addr
AccountingStoragePort=$DBD_PORT
$nodes
EOF

    # slurmdbd insists on mode 0600 and ownership by SlurmUser (root).
    write_if_changed "$DBD_CONF_FILE" 0600 <<EOF || true
# Generated by tools/local_slurm.sh -- edits are overwritten on the next start.
AuthType=auth/munge
DbdAddr=$ctld_addr
DbdHost=$host
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=$DB_USER
StoragePass=$(cat "$DB_PASS_FILE")
StorageLoc=$DB_NAME
EOF
    chown root:root "$DBD_CONF_FILE"
    [ "$MULTI" = 1 ] || return 0

    echo "$NODES" >"$ETC/nodes"
    # Each node's /etc/hosts: its own name and the other nodes' at their bridge
    # addresses, this machine's (the controller's) name at the bridge's.
    local m
    for n in "${NODE_NAMES[@]}"; do
        mkdir -p "$DIR/spool/$n"
        {
            echo "# Generated by tools/local_slurm.sh: /etc/hosts of node $n (bind-mounted for its slurmd and jobs)"
            echo "127.0.0.1 localhost"
            echo "::1 localhost ip6-localhost ip6-loopback"
            echo "$CTLD_ADDR $host"
            for m in "${NODE_NAMES[@]}"; do echo "$(node_addr "$m") $m"; done
        } | write_if_changed "$ETC/hosts.$n" 0644 || true
    done
}

# ------------------------------------------------------------------- slurm --
start_slurmdbd() {
    if pid_alive "$RUN/slurmdbd.pid" slurmdbd; then return 0; fi
    rm -f "$RUN/slurmdbd.pid"
    # The daemons fork into the background themselves and write PidFile;
    # 9>&- keeps them from inheriting our lock (a later start would hang on it).
    # slurmdbd has no -f option: it reads slurmdbd.conf from the directory of
    # $SLURM_CONF (exported above), i.e. $ETC.
    setsid /usr/sbin/slurmdbd 9>&- </dev/null >>"$LOG/slurmdbd.out" 2>&1 ||
        { tail -n 30 "$LOG/slurmdbd.out" "$LOG/slurmdbd.log" >&2 2>/dev/null || true; die "slurmdbd failed to start"; }
    wait_pidfile "$RUN/slurmdbd.pid" slurmdbd 20 "$LOG/slurmdbd.log"
    STARTED+=("$RUN/slurmdbd.pid" slurmdbd)
    log "started slurmdbd (pid $(pid_of "$RUN/slurmdbd.pid"), 127.0.0.1:$DBD_PORT)"
}

# The cluster must exist in the accounting database, otherwise slurmctld
# logs errors and sacct has nothing. Adding a cluster also creates the "root"
# account with an association for user root. Accounting is not enforced
# (no AccountingStorageEnforce), so other users may submit too.
register_cluster() {
    local i out=""
    for ((i = 0; i < 300; i++)); do
        # First call also waits until slurmdbd has created its tables.
        if out="$(sacctmgr -n -P show cluster format=cluster 2>&1)"; then break; fi
        sleep 0.1
    done
    case "$out" in
    *"Connection refused"* | *"Unable to"* | *rror*)
        tail -n 30 "$LOG/slurmdbd.log" >&2 2>/dev/null || true
        die "slurmdbd does not answer: $out"
        ;;
    esac
    if ! printf '%s\n' "$out" | grep -qx "$CLUSTER"; then
        log "registering cluster $CLUSTER in accounting"
        sacctmgr -i add cluster "$CLUSTER" >&2
    fi
}

start_slurmctld() {
    if pid_alive "$RUN/slurmctld.pid" slurmctld; then return 0; fi
    rm -f "$RUN/slurmctld.pid"
    setsid /usr/sbin/slurmctld -f "$SLURM_CONF_FILE" 9>&- </dev/null >>"$LOG/slurmctld.out" 2>&1 ||
        { tail -n 30 "$LOG/slurmctld.out" "$LOG/slurmctld.log" >&2 2>/dev/null || true; die "slurmctld failed to start"; }
    wait_pidfile "$RUN/slurmctld.pid" slurmctld 20 "$LOG/slurmctld.log"
    STARTED+=("$RUN/slurmctld.pid" slurmctld)
    log "started slurmctld (pid $(pid_of "$RUN/slurmctld.pid"), 127.0.0.1:$CTLD_PORT)"
}

start_slurmd() {
    if [ "$MULTI" = 1 ]; then
        local n
        for n in "${NODE_NAMES[@]}"; do start_node_slurmd "$n"; done
        return 0
    fi
    if pid_alive "$RUN/slurmd.pid" slurmd; then return 0; fi
    rm -f "$RUN/slurmd.pid"
    # SLURM_CONF stays in slurmd's environment; its slurmstepd children
    # inherit it, which is how `stop` recognizes stray steps of this cluster.
    setsid /usr/sbin/slurmd -f "$SLURM_CONF_FILE" -N "$(hostname -s)" 9>&- </dev/null >>"$LOG/slurmd.out" 2>&1 ||
        { tail -n 30 "$LOG/slurmd.out" "$LOG/slurmd.log" >&2 2>/dev/null || true; die "slurmd failed to start"; }
    wait_pidfile "$RUN/slurmd.pid" slurmd 20 "$LOG/slurmd.log"
    STARTED+=("$RUN/slurmd.pid" slurmd)
    log "started slurmd (pid $(pid_of "$RUN/slurmd.pid"), 127.0.0.1:$SLURMD_PORT)"
}

# start_node_slurmd NODE: slurmd -N NODE inside the node's network namespace,
# in a mount namespace of its own (private propagation: the /etc/hosts bind
# mount stays there) and a UTS namespace with the node's host name. slurmd
# daemonizes and keeps all three; its slurmstepds and their jobs inherit them.
# nsenter --net, not `ip netns exec`: that remounts /sys for the namespace,
# which hides the cgroup mounts slurmd looks at.
start_node_slurmd() {
    local n="$1"
    if pid_alive "$RUN/slurmd-$n.pid" slurmd; then return 0; fi
    rm -f "$RUN/slurmd-$n.pid"
    # shellcheck disable=SC2016 # $1.. expand in the inner shell
    nsenter --net="/run/netns/$(node_ns "$n")" unshare --mount --uts -- /bin/sh -c '
        mount --bind "$1" /etc/hosts && hostname "$2" && exec setsid /usr/sbin/slurmd -f "$3" -N "$2"' sh \
        "$ETC/hosts.$n" "$n" "$SLURM_CONF_FILE" 9>&- </dev/null >>"$LOG/slurmd-$n.out" 2>&1 ||
        { tail -n 30 "$LOG/slurmd-$n.out" "$LOG/slurmd-$n.log" >&2 2>/dev/null || true; die "slurmd $n failed to start"; }
    wait_pidfile "$RUN/slurmd-$n.pid" slurmd 20 "$LOG/slurmd-$n.log"
    STARTED+=("$RUN/slurmd-$n.pid" slurmd)
    log "started slurmd $n (pid $(pid_of "$RUN/slurmd-$n.pid"), $(node_addr "$n"):$SLURMD_PORT in netns $(node_ns "$n"))"
}

# slurmd pid files and names: one, or one per node.
slurmd_pidfiles() {
    local n
    if [ "$MULTI" = 1 ]; then
        for n in "${NODE_NAMES[@]}"; do echo "$RUN/slurmd-$n.pid"; done
    else
        echo "$RUN/slurmd.pid"
    fi
}

# ------------------------------------------------------------------ network --
ns_exists() { [ -e "/run/netns/$1" ]; }

# The bridge with the controller's address, and per node a namespace joined
# to it by a veth pair. Idempotent: what exists is kept.
net_up() {
    local n ns veth out holder
    holder="$(ip -o -4 addr show 2>/dev/null | awk -v a="$CTLD_ADDR" -v b="$BRIDGE" 'index($4, a "/") == 1 && $2 != b { print $2 }')"
    [ -z "$holder" ] || die "$CTLD_ADDR is already an address of $holder; choose another network with SELFTRAIN_SLURM_NET"
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        out="$(ip link add "$BRIDGE" type bridge 2>&1)" || no_namespaces "ip link add $BRIDGE type bridge: $out"
        NET_CREATED=1
    fi
    ip addr replace "$CTLD_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for n in "${NODE_NAMES[@]}"; do
        ns="$(node_ns "$n")" veth="$(node_veth "$n")"
        if ! ns_exists "$ns"; then
            out="$(ip netns add "$ns" 2>&1)" || no_namespaces "ip netns add $ns: $out"
            NET_CREATED=1
        fi
        if ! ip -n "$ns" link show "$NS_IF" >/dev/null 2>&1; then
            ip link del "$veth" 2>/dev/null || true
            out="$(ip link add "$veth" type veth peer name "${veth}p" 2>&1)" || no_namespaces "ip link add $veth type veth: $out"
            ip link set "${veth}p" netns "$ns"
            ip -n "$ns" link set "${veth}p" name "$NS_IF"
        fi
        ip link set "$veth" master "$BRIDGE"
        ip link set "$veth" up
        ip -n "$ns" addr replace "$(node_addr "$n")/24" dev "$NS_IF"
        ip -n "$ns" link set lo up
        ip -n "$ns" link set "$NS_IF" up
    done
}

# Whatever still runs in our namespaces (job processes, slurmstepds, a slurmd
# without pid file) belongs to this cluster: SIGTERM, then SIGKILL.
kill_in_namespaces() {
    local n ns pids i
    for n in "${NODE_NAMES[@]}"; do
        ns="$(node_ns "$n")"
        ns_exists "$ns" || continue
        pids="$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
        [ -n "${pids// /}" ] || continue
        log "stopping processes left in netns $ns (pids: $pids)"
        # shellcheck disable=SC2086 # one pid per word
        kill -TERM $pids 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break
            sleep 0.1
        done
        pids="$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
        # shellcheck disable=SC2086
        [ -z "${pids// /}" ] || kill -KILL $pids 2>/dev/null || true
    done
}

net_down() {
    local n i
    for n in "${NODE_NAMES[@]}"; do
        if ns_exists "$(node_ns "$n")"; then ip netns del "$(node_ns "$n")" 2>/dev/null || true; fi
        ip link del "$(node_veth "$n")" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    # The kernel removes a namespace (and its veth) asynchronously: wait, so
    # that an immediate `start` does not trip over "File exists".
    for ((i = 0; i < 50; i++)); do
        ip -o link show 2>/dev/null | grep -qE ": ($STEM-v[0-9]|$BRIDGE)[@:]" || return 0
        sleep 0.1
    done
    log "warning: network devices of $STEM still present after 5 s"
}

# A changed slurm.conf (e.g. another SELFTRAIN_SLURM_MAX_ARRAY_SIZE) while the
# daemons run: restart them. `scontrol reconfigure` is not enough in 22.05:
# `scontrol show config` then reports the new MaxArraySize but submissions are
# still checked against the old one. Jobs and their running steps survive
# (state is saved in StateSaveLocation; slurmstepd does not depend on slurmd).
restart_if_conf_changed() {
    [ "$SLURM_CONF_CHANGED" = 1 ] || return 0
    local pidfile running=0
    pid_alive "$RUN/slurmctld.pid" slurmctld && running=1
    any_slurmd_alive && running=1
    if [ "$running" = 1 ]; then
        log "slurm.conf changed; restarting slurmctld and slurmd"
        while read -r pidfile; do stop_pidfile "$pidfile" slurmd; done < <(slurmd_pidfiles)
        stop_pidfile "$RUN/slurmctld.pid" slurmctld
    fi
}

wait_idle() {
    if [ "$MULTI" = 1 ]; then
        wait_nodes_idle
        return 0
    fi
    local deadline state="" resumed=0
    deadline=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < deadline)); do
        state="$(timeout 10 sinfo -h -o %T 2>/dev/null | head -n 1 || true)"
        case "$state" in
        idle | mixed | allocated) return 0 ;;
        drained | draining)
            # A node drained by an earlier run (e.g. "Kill task failed") would
            # never become idle by itself.
            if [ "$resumed" = 0 ]; then
                log "node is $state; resuming it"
                scontrol update nodename="$(hostname -s)" state=resume >&2 || true
                resumed=1
            fi
            ;;
        esac
        sleep 0.2
    done
    log "node did not become idle within $START_TIMEOUT s (state: '${state:-?}'); last log lines:"
    local f
    for f in slurmctld slurmd slurmdbd; do
        echo "---- $LOG/$f.log" >&2
        tail -n 20 "$LOG/$f.log" >&2 2>/dev/null || true
    done
    die "node not idle"
}

# Several nodes: until every node is idle (or busy with jobs), then whether
# the nodes reach each other over the bridge (a firewall on bridged traffic
# would let each talk to the controller and still break DDP between them).
wait_nodes_idle() {
    local deadline n st up resumed=" " listing=""
    deadline=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < deadline)); do
        up=0
        listing="$(timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null || true)"
        while read -r n st; do
            case "$st" in
            idle | mixed | allocated) up=$((up + 1)) ;;
            drained | draining)
                case "$resumed" in *" $n "*) ;; *)
                    log "node $n is $st; resuming it"
                    scontrol update nodename="$n" state=resume >&2 || true
                    resumed="$resumed$n "
                    ;;
                esac
                ;;
            esac
        done <<<"$listing"
        if [ "$up" -ge "$NODES" ]; then
            for n in "${NODE_NAMES[@]:1}"; do
                # shellcheck disable=SC2016 # $1, $2 expand in the inner shell
                timeout 5 nsenter --net="/run/netns/$(node_ns "$n")" /bin/bash -c \
                    'exec 3<>"/dev/tcp/$1/$2"' sh "$(node_addr n1)" "$SLURMD_PORT" 2>/dev/null ||
                    die "node $n cannot reach n1 ($(node_addr n1):$SLURMD_PORT) over the bridge $BRIDGE (a firewall on bridged traffic?)"
            done
            return 0
        fi
        sleep 0.2
    done
    log "nodes not idle within $START_TIMEOUT s (sinfo: $(echo "$listing" | tr '\n' ',')); last log lines:"
    local f
    for f in slurmctld "${NODE_NAMES[@]/#/slurmd-}" slurmdbd; do
        echo "---- $LOG/$f.log" >&2
        tail -n 20 "$LOG/$f.log" >&2 2>/dev/null || true
    done
    die "nodes not idle"
}

# ----------------------------------------------------------------- actions --
do_start() {
    install_packages
    mkdir -p "$ETC" "$RUN" "$LOG" "$DIR/state/slurmctld" "$DIR/spool/slurmd" "$DIR/mysql"
    write_configs
    check_ports
    if [ "$MULTI" = 1 ]; then net_up; fi
    start_munge
    start_mariadb
    setup_database
    start_slurmdbd
    register_cluster
    restart_if_conf_changed
    start_slurmctld
    start_slurmd
    wait_idle
    if [ "$MULTI" = 1 ]; then
        log "cluster '$CLUSTER' is up in $DIR ($NODES nodes idle: ${NODE_NAMES[*]} on $NET.0/24, bridge $BRIDGE)"
    else
        log "cluster '$CLUSTER' is up in $DIR (node idle)"
    fi
    echo "export SLURM_CONF=$SLURM_CONF_FILE"
}

# slurmstepd processes whose environment carries our SLURM_CONF (inherited from
# the slurmd we started): steps of this cluster's jobs.
our_stepds() {
    local d pid
    for d in /proc/[0-9]*; do
        pid="${d#/proc/}"
        [ "$(cat "$d/comm" 2>/dev/null || true)" = slurmstepd ] || continue
        if tr '\0' '\n' 2>/dev/null <"$d/environ" | grep -qxF "SLURM_CONF=$SLURM_CONF_FILE"; then
            echo "$pid"
        fi
    done
}

# descendants PID...: the given pids and all their descendants (by PPid), so
# a step's job processes can be signalled with it. Start times are not
# compared: the tree is read once and signalled right away.
descendants() {
    local all="" d ppid changed=1 p
    all=" $* "
    while [ "$changed" = 1 ]; do
        changed=0
        for d in /proc/[0-9]*; do
            p="${d#/proc/}"
            case "$all" in *" $p "*) continue ;; esac
            ppid="$(awk '/^PPid:/ { print $2 }' "$d/status" 2>/dev/null || true)"
            case "$all" in *" $ppid "*)
                all="$all$p "
                changed=1
                ;;
            esac
        done
    done
    all="${all# }"
    echo "${all% }"
}

# True if any slurmctld/slurmd/slurmdbd/slurmstepd process is alive (ours are
# stopped by the time this is asked; zombies do not count).
other_slurm_daemons() {
    local d
    for d in /proc/[0-9]*; do
        case "$(cat "$d/comm" 2>/dev/null || true)" in
        slurmctld | slurmd | slurmdbd | slurmstepd)
            grep -q '^State:[[:space:]]*Z' "$d/status" 2>/dev/null || return 0
            ;;
        esac
    done
    return 1
}

# True if a slurmd of this cluster runs.
any_slurmd_alive() {
    local pidfile
    while read -r pidfile; do
        pid_alive "$pidfile" slurmd && return 0
    done < <(slurmd_pidfiles)
    return 1
}

do_stop() {
    local i pids pid pidfile
    # Cancel all jobs first, so that their slurmstepd/job processes end
    # through SLURM (slurmstepd is not a child of slurmd and would otherwise
    # outlive it) and a later `start` does not resume old pending jobs. A test
    # cluster: nothing is meant to survive `stop` but accounting (sacct).
    if pid_alive "$RUN/slurmctld.pid" slurmctld; then
        if [ -n "$(timeout 10 squeue -h -o %i 2>/dev/null || true)" ]; then
            log "cancelling remaining jobs"
            timeout 10 squeue -h -o %i 2>/dev/null | xargs -r timeout 10 scancel --full >/dev/null 2>&1 || true
            # Wait for the steps to end (KillWait=5 bounds it); without slurmd
            # nothing would confirm it, the safety net below handles that.
            if any_slurmd_alive; then
                for ((i = 0; i < 150; i++)); do
                    [ -z "$(timeout 10 squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null || true)" ] && break
                    sleep 0.1
                done
            fi
        fi
    fi
    while read -r pidfile; do stop_pidfile "$pidfile" slurmd; done < <(slurmd_pidfiles)
    stop_pidfile "$RUN/slurmctld.pid" slurmctld
    stop_pidfile "$RUN/slurmdbd.pid" slurmdbd
    stop_pidfile "$RUN/mariadbd.pid" mariadbd
    # Safety net: steps that outlived the cancel (e.g. slurmctld was already
    # gone). Matched by our SLURM_CONF in their environment, never by name
    # only. Killing a slurmstepd does not kill its job, so the whole process
    # tree under it goes (what proctrack/linuxproc would have signalled).
    pids="$(our_stepds)"
    if [ -n "$pids" ]; then
        # shellcheck disable=SC2086 # one pid per word
        pids="$(descendants $pids)"
        # shellcheck disable=SC2086
        log "stopping leftover job steps of this cluster (pids:" $pids")"
        for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
        sleep 1
        for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
    fi
    # Several nodes: what is left in the nodes' namespaces, then the
    # namespaces, the veths and the bridge.
    if [ "$MULTI" = 1 ]; then
        kill_in_namespaces
        net_down
    fi
    # Only a munged that this script started (its pid was copied here), and
    # only if no other SLURM daemon on the machine (e.g. a cluster in another
    # DIR) still authenticates through it; then it stays, and so does its pid
    # file, so a later `stop` of this DIR retries.
    if pid_alive "$RUN/munged.pid" munged; then
        if other_slurm_daemons; then
            log "leaving munged (pid $(pid_of "$RUN/munged.pid")) running: other SLURM daemons use it"
        else
            stop_pidfile "$RUN/munged.pid" munged
        fi
    fi
    log "stopped (state kept in $DIR; rm -rf it for a clean start)"
}

do_status() {
    local ok=0 name pidfile
    echo "local SLURM cluster in $DIR (SLURM_CONF=$SLURM_CONF_FILE)"
    for name in mariadbd slurmdbd slurmctld $([ "$MULTI" = 1 ] && printf 'slurmd-%s ' "${NODE_NAMES[@]}" || echo slurmd); do
        pidfile="$RUN/$name.pid"
        if pid_alive "$pidfile" "${name%%-*}"; then
            echo "$name: running (pid $(pid_of "$pidfile"))"
        else
            echo "$name: not running"
            ok=3
        fi
    done
    if [ "$MULTI" = 1 ]; then
        local n
        for n in "${NODE_NAMES[@]}"; do
            if ns_exists "$(node_ns "$n")"; then
                echo "node $n: netns $(node_ns "$n"), $(node_addr "$n")"
            else
                echo "node $n: netns $(node_ns "$n") missing"
                ok=3
            fi
        done
    fi
    if pid_alive "$RUN/munged.pid" munged; then
        echo "munged: running (pid $(pid_of "$RUN/munged.pid"), started by this script)"
    elif command -v munge >/dev/null 2>&1 && munge_works; then
        echo "munged: running (not started by this script)"
    else
        echo "munged: not running"
        ok=3
    fi
    if [ "$MULTI" = 1 ] && [ "$ok" != 0 ]; then
        # Without the bridge the controller's address may lead anywhere (or nowhere, for 10 s).
        echo "sinfo: not asked (the cluster is not up)"
    elif [ -f "$SLURM_CONF_FILE" ] && command -v sinfo >/dev/null 2>&1; then
        timeout 10 sinfo || ok=3
    else
        echo "sinfo: not available (never started here?)"
        ok=3
    fi
    return "$ok"
}

# One start/stop at a time per DIR (e.g. parallel test workers). The lock fd
# is closed for every daemon we start (9>&-), so it dies with this script.
lock_dir() {
    mkdir -p "$DIR"
    exec 9>"$DIR/.lock"
    flock 9
}

case "$ACTION" in
start)
    lock_dir
    do_start
    ;;
stop)
    if [ ! -d "$RUN" ]; then
        log "nothing to stop in $DIR"
        exit 0
    fi
    lock_dir
    do_stop
    ;;
status)
    rc=0
    do_status || rc=$?
    exit "$rc"
    ;;
esac
