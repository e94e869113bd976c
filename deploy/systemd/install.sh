#!/bin/sh
# Install the migration's systemd units. Run as root from a checkout, after the code is in
# /opt/cloud-migration (README, "Running under systemd"):
#
#   sudo sh deploy/systemd/install.sh
#
# - copies the units (the chain's and migrate.py's, cloud-migration-together.service), the
#   worker templates (python_zipper@.service, ...) and the timers to /etc/systemd/system;
# - installs the shared settings (cloud-migration-common.conf) once, as
#   /etc/cloud-migration/units.conf, and links it into each unit's drop-in directory as
#   <unit>.d/10-cloud-migration.conf (a later unit, e.g. a template, needs only one more link);
# - copies migration.env.example to /etc/cloud-migration/migration.env, mode 0600, unless
#   that file exists (it is never overwritten);
# - creates the system user cloud-migration and /var/lib/cloud-migration, and reloads systemd.
# It enables and starts nothing. Run it again after updating the checkout.
#
# DESTDIR=<dir> installs the files into <dir> instead and skips the user and the reload
# (tests/e2e/test_deploy.py does that, then runs systemd-analyze verify on the result).
set -eu
src=$(cd "$(dirname "$0")" && pwd)
dest=${DESTDIR:-}
# The chain (the stages one after the other) and migrate.py (the stages together).
units="master_mapper.service python_zipper.service python_unzipper.service cloud-migration.service
       cloud-migration-together.service"
# The worker templates (README, "Many machines"): instance = WORKER_INDEX.
templates="master_mapper@.service python_zipper@.service python_unzipper@.service cloud-migration@.service
           cloud-migration-together@.service"
# OnFailure= of every unit above; it takes no drop-in (it must not trigger itself).
notify="cloud-migration-notify@.service"
timers="cloud-migration.timer cloud-migration@.timer cloud-migration-together.timer cloud-migration-together@.timer"

install -d -m 0755 "$dest/etc/systemd/system" "$dest/etc/cloud-migration"
for unit in $units $templates $notify $timers; do
    install -m 0644 "$src/$unit" "$dest/etc/systemd/system/$unit"
done
install -m 0644 "$src/cloud-migration-common.conf" "$dest/etc/cloud-migration/units.conf"
for unit in $units $templates; do
    install -d -m 0755 "$dest/etc/systemd/system/$unit.d"
    # Relative, so the link also works inside DESTDIR.
    ln -sfn ../../../cloud-migration/units.conf "$dest/etc/systemd/system/$unit.d/10-cloud-migration.conf"
done
if [ ! -e "$dest/etc/cloud-migration/migration.env" ]; then
    (umask 077 && cp "$src/migration.env.example" "$dest/etc/cloud-migration/migration.env")
    chmod 0600 "$dest/etc/cloud-migration/migration.env"
    echo "wrote $dest/etc/cloud-migration/migration.env from the example: edit it (mode 0600)"
fi

if [ -z "$dest" ]; then
    if ! getent passwd cloud-migration >/dev/null; then
        useradd --system --user-group --home-dir /var/lib/cloud-migration --no-create-home \
            --shell /usr/sbin/nologin cloud-migration
    fi
    install -d -m 0700 -o cloud-migration -g cloud-migration /var/lib/cloud-migration
    systemctl daemon-reload
    echo "installed; next: edit /etc/cloud-migration/migration.env, put rclone.conf in" \
         "/var/lib/cloud-migration, then one of: systemctl enable --now cloud-migration-together.timer" \
         "(the stages together, migrate.py), cloud-migration.timer (the stages one after the other)," \
         "or cloud-migration-together@<index>.timer for each worker (WORKER_COUNT in migration.env)"
fi
