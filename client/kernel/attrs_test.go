package kernel

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/lvnbd/lvnbd/nbd"
)

// Netlink attributes are in host byte order; the literal bytes below are
// little-endian ones, as on amd64 and arm64.
func skipBigEndian(t testing.TB) {
	t.Helper()
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		t.Skip("expected bytes are written for little-endian hosts")
	}
}

// unhex decodes hex written with spaces, "|" separators and "#" comments.
func unhex(t testing.TB, s string) []byte {
	t.Helper()
	var digits strings.Builder
	for line := range strings.Lines(s) {
		line, _, _ = strings.Cut(line, "#")
		digits.WriteString(strings.NewReplacer(" ", "", "\n", "", "\t", "", "|", "").Replace(line))
	}
	b, err := hex.DecodeString(digits.String())
	if err != nil {
		t.Fatalf("bad hex in test: %v", err)
	}
	return b
}

// nla builds one attribute: length, type, payload, padding to 4 bytes.
func nla(typ uint16, payload ...[]byte) []byte {
	var data []byte
	for _, p := range payload {
		data = append(data, p...)
	}
	b := binary.NativeEndian.AppendUint16(nil, uint16(4+len(data)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func u32(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }
func u64(v uint64) []byte { return binary.NativeEndian.AppendUint64(nil, v) }

const nested = 0x8000 // NLA_F_NESTED

func TestConnectAttrsBytes(t *testing.T) {
	skipBigEndian(t)
	cfg := Config{
		Index:           3,
		Size:            1 << 20,
		BlockSize:       4096,
		Timeout:         30 * time.Second,
		DeadConnTimeout: 60 * time.Second,
		// DF and CACHE are not for the kernel and must be dropped.
		ServerFlags: nbd.FlagHasFlags | nbd.FlagSendFlush | nbd.FlagSendFUA | nbd.FlagSendTrim |
			nbd.FlagCanMultiConn | nbd.FlagSendDF | nbd.FlagSendCache,
		Backend: "nbd://h:1/e",
	}
	got, err := connectAttrs(&cfg, []uint32{5, 6})
	if err != nil {
		t.Fatal(err)
	}
	want := unhex(t, `
		08 00 01 00 | 03 00 00 00                          # NBD_ATTR_INDEX 3
		0c 00 02 00 | 00 00 10 00 00 00 00 00              # NBD_ATTR_SIZE_BYTES 1 MiB
		0c 00 03 00 | 00 10 00 00 00 00 00 00              # NBD_ATTR_BLOCK_SIZE_BYTES 4096
		0c 00 04 00 | 1e 00 00 00 00 00 00 00              # NBD_ATTR_TIMEOUT 30
		0c 00 08 00 | 3c 00 00 00 00 00 00 00              # NBD_ATTR_DEAD_CONN_TIMEOUT 60
		0c 00 05 00 | 2d 01 00 00 00 00 00 00              # NBD_ATTR_SERVER_FLAGS 0x12d
		1c 00 07 80                                        # NBD_ATTR_SOCKETS, NLA_F_NESTED
		  0c 00 01 80 | 08 00 01 00 | 05 00 00 00          #   NBD_SOCK_ITEM { NBD_SOCK_FD 5 }
		  0c 00 01 80 | 08 00 01 00 | 06 00 00 00          #   NBD_SOCK_ITEM { NBD_SOCK_FD 6 }
		10 00 0a 00 | 6e 62 64 3a 2f 2f 68 3a 31 2f 65 00  # NBD_ATTR_BACKEND_IDENTIFIER "nbd://h:1/e"
	`)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("CONNECT attributes (-want +got):\n%s", diff)
	}
}

func TestConnectAttrs(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		fds  []uint32
		want []byte
	}{
		{
			// Any device: no index; no timeouts, client flags or backend
			// unless asked; block size 0 means 512.
			name: "minimal",
			cfg:  Config{Index: AnyDevice, Size: 512, ServerFlags: nbd.FlagHasFlags},
			fds:  []uint32{3},
			want: concat(
				nla(attrSizeBytes, u64(512)),
				nla(attrBlockSizeBytes, u64(512)),
				nla(attrServerFlags, u64(1)),
				nla(attrSockets|nested, nla(sockItem|nested, nla(sockFD, u32(3)))),
			),
		},
		{
			name: "read-only forced, timeouts rounded up, client flags",
			cfg: Config{Index: 0, Size: 4096, ServerFlags: nbd.FlagHasFlags | nbd.FlagSendFlush, ReadOnly: true,
				Timeout: 1500 * time.Millisecond, DeadConnTimeout: time.Nanosecond, ClientFlags: DisconnectOnClose},
			fds: []uint32{7},
			want: concat(
				nla(attrIndex, u32(0)),
				nla(attrSizeBytes, u64(4096)),
				nla(attrBlockSizeBytes, u64(512)),
				nla(attrTimeout, u64(2)),
				nla(attrDeadConnTimeout, u64(1)),
				nla(attrServerFlags, u64(uint64(nbd.FlagHasFlags|nbd.FlagSendFlush|nbd.FlagReadOnly))),
				nla(attrClientFlags, u64(uint64(DisconnectOnClose))),
				nla(attrSockets|nested, nla(sockItem|nested, nla(sockFD, u32(7)))),
			),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := connectAttrs(&tt.cfg, tt.fds)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func TestReconfigureAttrs(t *testing.T) {
	tests := []struct {
		name    string
		r       Reconfig
		backend string
		fds     []uint32
		want    []byte
	}{
		{
			name:    "sockets",
			backend: "nbd://a:10809/x",
			fds:     []uint32{9, 10},
			want: concat(
				nla(attrIndex, u32(4)),
				nla(attrSockets|nested,
					nla(sockItem|nested, nla(sockFD, u32(9))),
					nla(sockItem|nested, nla(sockFD, u32(10)))),
				nla(attrBackendIdentifier, []byte("nbd://a:10809/x\x00")),
			),
		},
		{
			name: "size and timeouts only",
			r:    Reconfig{Size: 8 << 20, Timeout: 5 * time.Second, DeadConnTimeout: 10 * time.Second},
			want: concat(
				nla(attrIndex, u32(4)),
				nla(attrSizeBytes, u64(8<<20)),
				nla(attrTimeout, u64(5)),
				nla(attrDeadConnTimeout, u64(10)),
			),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := reconfigureAttrs(4, &tt.r, tt.backend, tt.fds)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func concat(parts ...[]byte) []byte {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

func TestParseIndex(t *testing.T) {
	skipBigEndian(t)
	tests := []struct {
		name    string
		in      string
		want    int
		wantErr bool
	}{
		{name: "connect reply", in: "08 00 01 00 07 00 00 00", want: 7},
		{name: "other attributes ignored", in: "0c 00 02 00 00 10 00 00 00 00 00 00 | 08 00 01 00 02 00 00 00", want: 2},
		{name: "empty", in: "", wantErr: true},
		{name: "index of the wrong size", in: "06 00 01 00 07 00 00 00", wantErr: true},
		{name: "truncated", in: "08 00 01 00 07 00", wantErr: true},
		{name: "length past the end", in: "40 00 01 00 07 00 00 00", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseIndex(unhex(t, tt.in))
			if tt.wantErr {
				if !errors.Is(err, errMalformed) {
					t.Fatalf("parseIndex = %d, %v; want an errMalformed", got, err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("parseIndex = %d, %v; want %d", got, err, tt.want)
			}
		})
	}
}

// statusReply is what nbd_genl_status builds (nla_nest_start_noflag: no
// NLA_F_NESTED) for nbd0 connected and nbd1 free.
const statusReply = `
	2c 00 09 00
	  14 00 01 00 | 08 00 01 00 00 00 00 00 | 05 00 02 00 01 00 00 00
	  14 00 01 00 | 08 00 01 00 01 00 00 00 | 05 00 02 00 00 00 00 00`

func TestParseDeviceList(t *testing.T) {
	skipBigEndian(t)
	tests := []struct {
		name    string
		in      string
		want    []deviceStatus
		wantErr bool
	}{
		{name: "kernel reply", in: statusReply, want: []deviceStatus{{Index: 0, Connected: true}, {Index: 1}}},
		{name: "empty list", in: "04 00 09 00", want: nil},
		{name: "no list", in: "", want: nil},
		{name: "item without index", in: "10 00 09 00 | 0c 00 01 00 | 05 00 02 00 01 00 00 00", wantErr: true},
		{name: "connected of the wrong size", in: "18 00 09 00 | 14 00 01 00 | 08 00 01 00 00 00 00 00 | 08 00 02 00 01 00 00 00", wantErr: true},
		{name: "item overruns list", in: "0c 00 09 00 | 14 00 01 00 | 08 00 01 00", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseDeviceList(unhex(t, tt.in))
			if tt.wantErr {
				if !errors.Is(err, errMalformed) {
					t.Fatalf("parseDeviceList = %v, %v; want an errMalformed", got, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func TestEncodeDeviceListRoundTrip(t *testing.T) {
	want := []deviceStatus{{Index: 0, Connected: true}, {Index: 15}, {Index: 1 << 19, Connected: true}}
	b, err := encodeDeviceList(want)
	if err != nil {
		t.Fatal(err)
	}
	got, err := parseDeviceList(b)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

func familyAttrs(id uint16, groups map[string]uint32) []byte {
	var gs [][]byte
	i := uint16(1)
	for name, gid := range groups {
		gs = append(gs, nla(i|nested,
			nla(unix.CTRL_ATTR_MCAST_GRP_NAME, []byte(name+"\x00")),
			nla(unix.CTRL_ATTR_MCAST_GRP_ID, u32(gid))))
		i++
	}
	return concat(
		nla(unix.CTRL_ATTR_FAMILY_NAME, []byte("nbd\x00")),
		nla(unix.CTRL_ATTR_FAMILY_ID, binary.NativeEndian.AppendUint16(nil, id)),
		nla(unix.CTRL_ATTR_VERSION, u32(1)),
		nla(unix.CTRL_ATTR_MCAST_GROUPS|nested, concat(gs...)),
	)
}

func TestParseFamily(t *testing.T) {
	got, err := parseFamily(familyAttrs(0x1d, map[string]uint32{"nbd_mc_group": 9}))
	if err != nil {
		t.Fatal(err)
	}
	want := family{ID: 0x1d, Groups: map[string]uint32{"nbd_mc_group": 9}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	for name, b := range map[string][]byte{
		"no id":     nla(unix.CTRL_ATTR_FAMILY_NAME, []byte("nbd\x00")),
		"short id":  nla(unix.CTRL_ATTR_FAMILY_ID, []byte{1}),
		"truncated": familyAttrs(0x1d, nil)[:7],
	} {
		if _, err := parseFamily(b); !errors.Is(err, errMalformed) {
			t.Errorf("%s: parseFamily error = %v, want errMalformed", name, err)
		}
	}
}

func FuzzParseDeviceList(f *testing.F) {
	for _, s := range []string{statusReply, "04 00 09 00", "10 00 09 00 | 0c 00 01 00 | 05 00 02 00 01 00 00 00"} {
		f.Add(unhex(f, s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		devs, err := parseDeviceList(b)
		if err != nil {
			return
		}
		enc, err := encodeDeviceList(devs)
		if err != nil {
			t.Fatalf("encoding %v: %v", devs, err)
		}
		again, err := parseDeviceList(enc)
		if err != nil {
			t.Fatalf("decoding our own encoding of %v: %v", devs, err)
		}
		if diff := cmp.Diff(devs, again); diff != "" {
			t.Fatalf("round trip (-first +second):\n%s", diff)
		}
	})
}

func FuzzParseIndex(f *testing.F) {
	for _, s := range []string{"08 00 01 00 07 00 00 00", "06 00 01 00 07 00 00 00", ""} {
		f.Add(unhex(f, s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		index, err := parseIndex(b)
		if err != nil {
			return
		}
		enc, err := indexAttrs(index)
		if err != nil {
			t.Fatal(err)
		}
		again, err := parseIndex(enc)
		if err != nil || again != index {
			t.Fatalf("round trip of %d: got %d, %v", index, again, err)
		}
	})
}

func FuzzParseFamily(f *testing.F) {
	f.Add(familyAttrs(0x1d, map[string]uint32{"nbd_mc_group": 9}))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		fam, err := parseFamily(b)
		if err == nil && fam.ID == 0 {
			t.Fatal("accepted a family without an id")
		}
	})
}
