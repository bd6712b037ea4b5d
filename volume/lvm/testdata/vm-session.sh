#!/bin/bash
# timeout: 240
. "$(dirname "$0")/lib.sh"
need_lvnbd
pvcreate -y /dev/ram0 /dev/ram1 /dev/ram2
vgcreate vg0 /dev/ram0 /dev/ram1 /dev/ram2
lvcreate --yes -L 64m -T vg0/pool
lvcreate --yes -n thin1 -V 64m -T vg0/pool --addtag lvnbd
lvcreate --yes -n root -L 8m vg0
LVNBD_TEST_LVM_VG=vg0 LVNBD_TEST_LVM_RECORD=$PWD/session.json lvnbd -test.run 'TestSessionReal' -test.v -test.count=1 2>&1 | tee test.log
grep -q '^--- PASS' test.log || fail "TestSessionReal did not pass"
capture session.json cat session.json
vgremove -ff -y vg0
