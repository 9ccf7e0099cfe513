#!/usr/bin/env bash
# Tests the built .deb on this machine (as root; CI runs it): lintian, install, files,
# modes, user, enablement, `systemd-analyze verify` and `security`, the installed binary's
# check-config, then purge and check that everything is gone.
set -euo pipefail
cd "$(dirname "$0")/.."

deb=$(ls -t target/debian/etcd-backup_*.deb | head -n 1)
fail() { echo "test-deb: FAILED: $*" >&2; exit 1; }
PASSED=0
pass() { PASSED=$((PASSED + 1)); echo "test-deb: ok: $*"; }

if ! command -v lintian >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends lintian >/dev/null
fi
echo "== lintian $deb"
lintian --fail-on error --display-info "$deb" || fail "lintian reports errors"
pass "lintian: no errors"

if dpkg -s etcd-backup >/dev/null 2>&1; then dpkg --purge etcd-backup >/dev/null; fi
echo "== dpkg -i"
dpkg -i "$deb"

[ -x /usr/bin/etcd-backup ] || fail "/usr/bin/etcd-backup missing"
getent passwd etcd-backup >/dev/null || fail "user etcd-backup missing"
[ "$(stat -c '%a %U %G' /etc/etcd-backup/config.toml)" = "640 root etcd-backup" ] \
  || fail "config mode/owner: $(stat -c '%a %U %G' /etc/etcd-backup/config.toml)"
grep -qx /etc/etcd-backup/config.toml /var/lib/dpkg/info/etcd-backup.conffiles || fail "config is not a conffile"
[ "$(stat -c '%a %U %G' /var/lib/etcd-backup)" = "750 etcd-backup etcd-backup" ] || fail "state dir mode/owner"
unit=$(dpkg -L etcd-backup | grep "/systemd/system/etcd-backup.service$")
[ -f "$unit" ] || fail "unit missing"
[ -L /etc/systemd/system/multi-user.target.wants/etcd-backup.service ] || fail "unit not enabled"
for f in /usr/share/man/man1/etcd-backup.1.gz /usr/share/man/man1/etcd-backup-snapshot.1.gz \
         /usr/share/bash-completion/completions/etcd-backup \
         /usr/share/etcd-backup/prometheus/etcd-backup.rules.yml \
         /usr/share/doc/etcd-backup/config.example.toml /usr/share/doc/etcd-backup/changelog.Debian.gz \
         /usr/share/doc/etcd-backup/copyright; do
  [ -f "$f" ] || fail "$f missing"
done
pass "files, modes, user, conffile, enablement"

echo "== systemd-analyze verify"
out=$(systemd-analyze verify "$unit" 2>&1) || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify printed: $out"
pass "systemd-analyze verify"
score=$(systemd-analyze security --offline=true "$unit" 2>/dev/null | sed -n 's/.*Overall exposure level[^:]*: \([0-9.]*\).*/\1/p')
echo "systemd-analyze security exposure: $score"
awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 2.0) }' || fail "exposure $score is above 2.0"
pass "exposure $score <= 2.0"

echo "== installed check-config"
/usr/bin/etcd-backup check-config --config /etc/etcd-backup/config.toml >/dev/null || fail "check-config"
/usr/bin/etcd-backup --version
pass "check-config on the shipped configuration"

echo "== reinstall (upgrade path) keeps the edited configuration"
echo "# edited by the operator" >> /etc/etcd-backup/config.toml
dpkg -i --force-confold "$deb" >/dev/null
grep -q "^# edited by the operator$" /etc/etcd-backup/config.toml || fail "the edited configuration was replaced"
[ "$(stat -c '%a %U %G' /etc/etcd-backup/config.toml)" = "640 root etcd-backup" ] || fail "config mode changed on upgrade"
pass "upgrade keeps the configuration and its mode"

echo "== dpkg --purge (backups are kept)"
# A backup in the default local store and a spool left by a cycle.
install -d -o etcd-backup -g etcd-backup /var/lib/etcd-backup/backups/kubernetes/20260101T000000Z-abcdef \
  /var/lib/etcd-backup/spool/cycle-1
echo data > /var/lib/etcd-backup/backups/kubernetes/20260101T000000Z-abcdef/snapshot.db.zst
echo '{}' > /var/lib/etcd-backup/backups/kubernetes/20260101T000000Z-abcdef/manifest.json
echo scratch > /var/lib/etcd-backup/spool/cycle-1/part
purge_out=$(dpkg --purge etcd-backup 2>&1)
echo "$purge_out"
for p in /usr/bin/etcd-backup /etc/etcd-backup /var/lib/etcd-backup/spool "$unit" \
         /etc/systemd/system/multi-user.target.wants/etcd-backup.service; do
  [ ! -e "$p" ] || fail "$p still there after purge"
done
for f in snapshot.db.zst manifest.json; do
  [ -f "/var/lib/etcd-backup/backups/kubernetes/20260101T000000Z-abcdef/$f" ] || fail "purge deleted a backup ($f)"
done
[[ "$purge_out" == *"purge kept /var/lib/etcd-backup"* ]] || fail "purge does not say where the backups are"
pass "purge removed the package, config and spool, and kept the backups"
rm -rf /var/lib/etcd-backup
# Without backups, purge leaves nothing.
dpkg -i "$deb" >/dev/null
dpkg --purge etcd-backup >/dev/null
[ ! -e /var/lib/etcd-backup ] || fail "/var/lib/etcd-backup still there after purging an install without backups"
pass "purge of an install without backups removes the state directory"
echo "test-deb: $PASSED passed, 0 failed"
