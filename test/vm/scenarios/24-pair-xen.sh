#!/bin/bash
# timeout: 600
# Xen glue, with a fake xl on PATH that records its arguments (Xen itself cannot run here):
# lvnbd pair xen-config prints the disk lines; with xen_domain and vdevs set, lvnbd pair up runs
# xl block-attach for both legs with those lines, lvnbd pair down runs xl block-detach for both
# and then detaches the devices. When xl fails, pair down leaves the devices attached (and
# asks xl for no further leg), and
# --force detaches them anyway.
# shellcheck source-path=SCRIPTDIR source=20-pair-lib.sh
. "$(dirname "$0")/20-pair-lib.sh"

mkdir -p fakebin
cat >fakebin/xl <<'XL'
#!/bin/bash
# Records one line per call: the arguments joined with '|'. Fails while $PWD/xl-fail exists.
(IFS='|'; echo "$*") >>"$XL_LOG"
[[ ! -e $XL_FAIL ]] || { echo "xl: the domain does not exist" >&2; exit 1; }
XL
chmod +x fakebin/xl
export PATH=$PWD/fakebin:$PATH XL_LOG=$PWD/xl.log XL_FAIL=$PWD/xl-fail
: >xl.log

setup_boxes
box_volume a create vm1 --size 64M
box_volume b create vm1 --size 64M
write_config 'xen_domain = "guest1"' 'vdevs = ["xvdb", "xvdc"]'

lvnbd pair xen-config --config client.toml vm1 >disks
printf '%s\n' 'format=raw, vdev=xvdb, access=rw, target=/dev/lvnbd/vm1/a' \
	'format=raw, vdev=xvdc, access=rw, target=/dev/lvnbd/vm1/b' >want
diff -u want disks || fail "pair xen-config"

# Starting the daemon gives nothing to the domain: pair up does.
start_client
assert_eq "" "$(cat xl.log)" "xl calls at start"
assert_eq xvdb "$(leg a vdev)" "vdev of leg a"
lvnbd pair up --control "$CLIENT_SOCK" vm1
printf '%s\n' 'block-attach|guest1|format=raw, vdev=xvdb, access=rw, target=/dev/lvnbd/vm1/a' \
	'block-attach|guest1|format=raw, vdev=xvdc, access=rw, target=/dev/lvnbd/vm1/b' >want
diff -u want xl.log || fail "xl calls of pair up"

# xl fails: the guest may still use the disks, so they stay attached.
: >xl.log
touch xl-fail
if lvnbd pair down --control "$CLIENT_SOCK" vm1 2>err; then fail "pair down succeeded with xl failing"; fi
cat err
grep -q "the domain does not exist" err || fail "pair down does not show xl's error: $(cat err)"
assert_eq 2 "$(nbd_running)" "attached nbd devices after a failed pair down"
assert_connected a "leg a after a failed pair down"
# Once xl fails for xvdb, xvdc is not taken from the guest either.
printf '%s\n' 'block-detach|guest1|xvdb' >want
diff -u want xl.log || fail "xl calls of the failed pair down"

# --force detaches them anyway.
: >xl.log
lvnbd pair down --force --control "$CLIENT_SOCK" vm1 || true
printf '%s\n' 'block-detach|guest1|xvdb' 'block-detach|guest1|xvdc' >want
diff -u want xl.log || fail "xl calls of pair down --force"
assert_eq 0 "$(nbd_running)" "attached nbd devices after pair down --force"
assert_eq down "$(leg a state)" "leg a after pair down --force"

# Up and down again, xl working.
rm xl-fail
: >xl.log
lvnbd pair up --control "$CLIENT_SOCK" vm1
assert_eq 2 "$(nbd_running)" "attached nbd devices after pair up"
lvnbd pair down --control "$CLIENT_SOCK" vm1
printf '%s\n' 'block-attach|guest1|format=raw, vdev=xvdb, access=rw, target=/dev/lvnbd/vm1/a' \
	'block-attach|guest1|format=raw, vdev=xvdc, access=rw, target=/dev/lvnbd/vm1/b' \
	'block-detach|guest1|xvdb' 'block-detach|guest1|xvdc' >want
diff -u want xl.log || fail "xl calls of pair up and down"
assert_eq 0 "$(nbd_running)" "attached nbd devices after pair down"

stop_client
