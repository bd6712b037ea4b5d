package server

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/google/go-cmp/cmp"

	"github.com/lvnbd/lvnbd/nbd"
)

func TestHandshakeOptions(t *testing.T) {
	disk, _ := fileExport(t, "disk", 1<<20, false)
	ro, _ := fileExport(t, "golden", 1<<20, true)
	ts := startServer(t, nil, disk, ro)

	type appender = interface{ AppendBinary([]byte) ([]byte, error) }
	tests := []struct {
		name       string
		structured bool // negotiate structured replies first
		opt        nbd.Option
		msg        appender
		raw        []byte // sent instead of msg when set
		want       []nbd.OptionReplyType
	}{
		{"list", false, nbd.OptList, nil, nil, []nbd.OptionReplyType{nbd.RepServer, nbd.RepServer, nbd.RepAck}},
		{"list with data", false, nbd.OptList, nil, []byte("x"), []nbd.OptionReplyType{nbd.RepErrInvalid}},
		{"info", false, nbd.OptInfo, nbd.InfoRequest{Name: "disk"}, nil, []nbd.OptionReplyType{nbd.RepInfo, nbd.RepInfo, nbd.RepAck}},
		{"info with name and description", false, nbd.OptInfo,
			nbd.InfoRequest{Name: "disk", Requests: []nbd.InfoType{nbd.InfoName, nbd.InfoDescription}}, nil,
			[]nbd.OptionReplyType{nbd.RepInfo, nbd.RepInfo, nbd.RepInfo, nbd.RepInfo, nbd.RepAck}},
		{"info unknown export", false, nbd.OptInfo, nbd.InfoRequest{Name: "nope"}, nil, []nbd.OptionReplyType{nbd.RepErrUnknown}},
		{"info malformed", false, nbd.OptInfo, nil, []byte{0, 0, 0, 9}, []nbd.OptionReplyType{nbd.RepErrInvalid}},
		{"structured reply", false, nbd.OptStructuredReply, nil, nil, []nbd.OptionReplyType{nbd.RepAck}},
		{"structured reply with data", false, nbd.OptStructuredReply, nil, []byte("x"), []nbd.OptionReplyType{nbd.RepErrInvalid}},
		{"meta context before structured", false, nbd.OptSetMetaContext,
			nbd.MetaContextRequest{Export: "disk", Queries: []string{"base:allocation"}}, nil, []nbd.OptionReplyType{nbd.RepErrInvalid}},
		{"set meta context", true, nbd.OptSetMetaContext,
			nbd.MetaContextRequest{Export: "disk", Queries: []string{"base:allocation"}}, nil,
			[]nbd.OptionReplyType{nbd.RepMetaContext, nbd.RepAck}},
		{"set unknown meta context", true, nbd.OptSetMetaContext,
			nbd.MetaContextRequest{Export: "disk", Queries: []string{"qemu:dirty-bitmap:x"}}, nil, []nbd.OptionReplyType{nbd.RepAck}},
		{"list all meta contexts", true, nbd.OptListMetaContext, nbd.MetaContextRequest{Export: "disk"}, nil,
			[]nbd.OptionReplyType{nbd.RepMetaContext, nbd.RepAck}},
		{"list base: namespace", true, nbd.OptListMetaContext,
			nbd.MetaContextRequest{Export: "disk", Queries: []string{"base:"}}, nil, []nbd.OptionReplyType{nbd.RepMetaContext, nbd.RepAck}},
		{"meta context unknown export", true, nbd.OptListMetaContext, nbd.MetaContextRequest{Export: "nope"}, nil,
			[]nbd.OptionReplyType{nbd.RepErrUnknown}},
		{"starttls unconfigured", false, nbd.OptStartTLS, nil, nil, []nbd.OptionReplyType{nbd.RepErrPolicy}},
		{"unknown option", false, nbd.Option(0xdead), nil, []byte("abc"), []nbd.OptionReplyType{nbd.RepErrUnsup}},
		{"extended headers unsupported", false, nbd.OptExtendedHeaders, nil, nil, []nbd.OptionReplyType{nbd.RepErrUnsup}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := dialRaw(t, ts.addr)
			c.greet(nbd.ClientFlagFixedNewstyle | nbd.ClientFlagNoZeroes)
			if tt.structured {
				c.option(nbd.OptStructuredReply, nil)
			}
			data := tt.raw
			if data == nil && tt.msg != nil {
				data, _ = tt.msg.AppendBinary(nil)
			}
			c.sendOption(tt.opt, data)
			var got []nbd.OptionReplyType
			for _, r := range c.optionReplies(tt.opt) {
				got = append(got, r.typ)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("replies (-want +got):\n%s", diff)
			}
			// The handshake goes on after every one of these: LIST still works.
			if r := c.option(nbd.OptList, nil); r[len(r)-1].typ != nbd.RepAck {
				t.Errorf("LIST after %s: %v", tt.name, r[len(r)-1].typ)
			}
		})
	}
}

func TestHandshakeInfoContents(t *testing.T) {
	disk, path := fileExport(t, "disk", 3<<20, false)
	ro, _ := fileExport(t, "golden", 1<<20, true)
	ts := startServer(t, nil, disk, ro)

	tests := []struct {
		name       string
		export     string
		structured bool
		want       []nbd.Info
	}{
		{"read-write simple", "disk", false, []nbd.Info{
			{Type: nbd.InfoExport, Size: 3 << 20, Flags: nbd.FlagHasFlags | nbd.FlagSendFlush | nbd.FlagSendFUA |
				nbd.FlagSendTrim | nbd.FlagSendWriteZeroes | nbd.FlagSendFastZero | nbd.FlagSendCache | nbd.FlagCanMultiConn},
			{Type: nbd.InfoBlockSize, MinBlockSize: 1, PrefBlockSize: 4096, MaxPayloadSize: 32 << 20},
			{Type: nbd.InfoName, Text: "disk"},
			{Type: nbd.InfoDescription, Text: path},
		}},
		{"read-write structured adds DF", "disk", true, []nbd.Info{
			{Type: nbd.InfoExport, Size: 3 << 20, Flags: nbd.FlagHasFlags | nbd.FlagSendFlush | nbd.FlagSendFUA |
				nbd.FlagSendTrim | nbd.FlagSendWriteZeroes | nbd.FlagSendFastZero | nbd.FlagSendCache |
				nbd.FlagCanMultiConn | nbd.FlagSendDF},
			{Type: nbd.InfoBlockSize, MinBlockSize: 1, PrefBlockSize: 4096, MaxPayloadSize: 32 << 20},
			{Type: nbd.InfoName, Text: "disk"},
			{Type: nbd.InfoDescription, Text: path},
		}},
		{"read-only advertises no writes", "golden", false, []nbd.Info{
			{Type: nbd.InfoExport, Size: 1 << 20, Flags: nbd.FlagHasFlags | nbd.FlagReadOnly | nbd.FlagSendFlush |
				nbd.FlagSendCache | nbd.FlagCanMultiConn},
			{Type: nbd.InfoBlockSize, MinBlockSize: 1, PrefBlockSize: 4096, MaxPayloadSize: 32 << 20},
			{Type: nbd.InfoName, Text: "golden"},
			{Type: nbd.InfoDescription, Text: ro.Description},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := dialRaw(t, ts.addr)
			c.greet(nbd.ClientFlagFixedNewstyle)
			if tt.structured {
				c.option(nbd.OptStructuredReply, nil)
			}
			var got []nbd.Info
			for _, r := range c.option(nbd.OptInfo, nbd.InfoRequest{Name: tt.export, Requests: []nbd.InfoType{nbd.InfoName, nbd.InfoDescription}}) {
				if r.typ != nbd.RepInfo {
					continue
				}
				var info nbd.Info
				if err := info.UnmarshalBinary(r.data); err != nil {
					t.Fatal(err)
				}
				got = append(got, info)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("info (-want +got):\n%s", diff)
			}
		})
	}
}

func TestExportName(t *testing.T) {
	disk, _ := fileExport(t, "disk", 1<<20, false)
	ts := startServer(t, nil, disk)
	for _, noZeroes := range []bool{false, true} {
		c := dialRaw(t, ts.addr)
		flags := nbd.ClientFlagFixedNewstyle
		if noZeroes {
			flags |= nbd.ClientFlagNoZeroes
		}
		c.greet(flags)
		c.sendOption(nbd.OptExportName, []byte("disk"))
		var r nbd.ExportNameReply
		if err := r.UnmarshalBinary(c.read(nbd.ExportNameReplySize)); err != nil {
			t.Fatal(err)
		}
		if r.Size != 1<<20 || r.Flags&nbd.FlagSendFlush == 0 || r.Flags&nbd.FlagSendDF != 0 {
			t.Errorf("export name reply %+v", r)
		}
		if !noZeroes && !bytes.Equal(c.read(nbd.ExportNameZeroPadding), make([]byte, nbd.ExportNameZeroPadding)) {
			t.Error("padding is not zeroes")
		}
		// Transmission works right after: a flush.
		c.request(nbd.RequestHeader{Command: nbd.CmdFlush, Handle: 5}, nil)
		if res := c.simpleReply(0); res.errno != 0 || res.handle != 5 {
			t.Errorf("flush after EXPORT_NAME: %+v", res)
		}
	}

	t.Run("default export is the only one", func(t *testing.T) {
		c := dialRaw(t, ts.addr)
		if info := c.open("", false); info.Size != 1<<20 {
			t.Errorf("default export size %d", info.Size)
		}
	})
	t.Run("unknown export hangs up", func(t *testing.T) {
		c := dialRaw(t, ts.addr)
		c.greet(nbd.ClientFlagFixedNewstyle)
		c.sendOption(nbd.OptExportName, []byte("nope"))
		c.expectClosed()
	})
	t.Run("abort is acknowledged", func(t *testing.T) {
		c := dialRaw(t, ts.addr)
		c.greet(nbd.ClientFlagFixedNewstyle)
		if r := c.option(nbd.OptAbort, nil); r[0].typ != nbd.RepAck {
			t.Errorf("abort: %v", r[0].typ)
		}
		c.expectClosed()
	})
}

func TestHandshakeViolationsCloseTheConnection(t *testing.T) {
	disk, _ := fileExport(t, "disk", 1<<20, false)
	ts := startServer(t, nil, disk)
	tests := []struct {
		name string
		send func(c *rawClient)
	}{
		{"unknown client flags", func(c *rawClient) {
			c.read(nbd.ServerHelloSize)
			c.write([]byte{0, 0, 0, 0x80})
		}},
		{"bad option magic", func(c *rawClient) {
			c.greet(nbd.ClientFlagFixedNewstyle)
			c.write(bytes.Repeat([]byte{0x41}, nbd.OptionHeaderSize))
		}},
		{"option longer than the limit", func(c *rawClient) {
			c.greet(nbd.ClientFlagFixedNewstyle)
			b, _ := nbd.OptionHeader{Option: nbd.OptList, Length: 0xffffffff}.AppendBinary(nil)
			c.write(b)
		}},
		{"non-fixed client sends LIST", func(c *rawClient) {
			c.greet(0)
			c.sendOption(nbd.OptList, nil)
		}},
		{"truncated option", func(c *rawClient) {
			c.greet(nbd.ClientFlagFixedNewstyle)
			b, _ := nbd.OptionHeader{Option: nbd.OptGo, Length: 100}.AppendBinary(nil)
			c.write(b[:10])
			c.nc.(interface{ CloseWrite() error }).CloseWrite()
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := dialRaw(t, ts.addr)
			tt.send(c)
			c.expectClosed()
		})
	}
	// And the server still serves a well-behaved client.
	c := dialRaw(t, ts.addr)
	c.open("disk", true)
	c.request(nbd.RequestHeader{Command: nbd.CmdRead, Handle: 1, Length: 512}, nil)
	if res := c.reply(512); res.errno != 0 {
		t.Fatalf("read after violations: %+v", res)
	}
}

func TestHandshakeTimeout(t *testing.T) {
	disk, _ := fileExport(t, "disk", 1<<20, false)
	ts := startServer(t, &Config{HandshakeTimeout: 200 * time.Millisecond}, disk)
	c := dialRaw(t, ts.addr)
	c.read(nbd.ServerHelloSize)
	// Say nothing: the server must hang up on its own.
	c.expectClosed()
}

func TestSizeIsReReadAtEachHandshake(t *testing.T) {
	disk, path := fileExport(t, "disk", 1<<20, false)
	ts := startServer(t, nil, disk)
	c := dialRaw(t, ts.addr)
	if info := c.open("disk", false); info.Size != 1<<20 {
		t.Fatalf("size %d", info.Size)
	}
	if err := os.Truncate(path, 3<<20); err != nil {
		t.Fatal(err)
	}
	// The connected client may now use the grown part (the kernel learns
	// the new size by RECONFIGURE, not by reconnecting) ...
	d := dialRaw(t, ts.addr)
	if info := d.open("disk", false); info.Size != 3<<20 {
		t.Fatalf("after truncate, a new handshake reports %d bytes, want %d", info.Size, 3<<20)
	}
	c.request(nbd.RequestHeader{Command: nbd.CmdWrite, Handle: 1, Offset: 3<<20 - 1, Length: 1}, []byte{7})
	if res := c.simpleReply(0); res.errno != 0 {
		t.Fatalf("write into the grown part on the old connection: %v", res.errno)
	}
}

// An option with more data than any lvnbd takes is read and answered, and
// the handshake goes on: NBD_REP_ERR_UNSUP for an option lvnbd does not
// implement (the spec's baseline: MUST reply, MUST NOT fail to parse the
// next), NBD_REP_ERR_TOO_BIG for one it does. Only past maxSkippedOption,
// or where no error reply exists, does it hang up.
func TestOversizedOptions(t *testing.T) {
	disk, _ := fileExport(t, "disk", 1<<20, false)
	ts := startServer(t, nil, disk)
	big := bytes.Repeat([]byte{0x55}, nbd.MaxOptionLength+1024)

	tests := []struct {
		name string
		opt  nbd.Option
		want nbd.OptionReplyType
	}{
		{"unknown option", nbd.Option(99), nbd.RepErrUnsup},
		{"unimplemented option", nbd.OptPeekExport, nbd.RepErrUnsup},
		{"LIST", nbd.OptList, nbd.RepErrTooBig},
		{"INFO", nbd.OptInfo, nbd.RepErrTooBig},
		{"GO", nbd.OptGo, nbd.RepErrTooBig},
		{"SET_META_CONTEXT", nbd.OptSetMetaContext, nbd.RepErrTooBig},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := dialRaw(t, ts.addr)
			c.greet(nbd.ClientFlagFixedNewstyle | nbd.ClientFlagNoZeroes)
			c.sendOption(tt.opt, big)
			if r := c.optionReplies(tt.opt); r[0].typ != tt.want {
				t.Fatalf("%v with %d bytes: %v %s, want %v", tt.opt, len(big), r[0].typ, r[0].data, tt.want)
			}
			// The next option is parsed: the data was skipped.
			if typ, msg := c.goReply("disk"); typ != nbd.RepAck {
				t.Fatalf("GO after the oversized option: %v %s", typ, msg)
			}
		})
	}

	t.Run("ABORT is acknowledged", func(t *testing.T) {
		c := dialRaw(t, ts.addr)
		c.greet(nbd.ClientFlagFixedNewstyle)
		c.sendOption(nbd.OptAbort, big)
		if r := c.optionReplies(nbd.OptAbort); r[0].typ != nbd.RepAck {
			t.Fatalf("ABORT: %v", r[0].typ)
		}
		c.expectClosed()
	})
	for _, tt := range []struct {
		name   string
		flags  nbd.ClientFlags
		opt    nbd.Option
		length uint32
	}{
		{"past the skipping limit", nbd.ClientFlagFixedNewstyle, nbd.Option(99), maxSkippedOption + 1},
		{"EXPORT_NAME, which has no error reply", nbd.ClientFlagFixedNewstyle, nbd.OptExportName, nbd.MaxOptionLength + 1},
		{"non-fixed-newstyle client", 0, nbd.Option(99), nbd.MaxOptionLength + 1},
	} {
		t.Run(tt.name+" hangs up", func(t *testing.T) {
			c := dialRaw(t, ts.addr)
			c.greet(tt.flags)
			b, _ := nbd.OptionHeader{Option: tt.opt, Length: tt.length}.AppendBinary(nil)
			c.write(b) // and not the data: the server must not wait for it
			c.expectClosed()
		})
	}
}

// handles says which options option's switch answers other than with
// NBD_REP_ERR_UNSUP (skipOversized relies on it).
func TestHandledOptions(t *testing.T) {
	disk, _ := fileExport(t, "disk", 1<<20, false)
	ts := startServer(t, nil, disk)
	for opt := nbd.Option(0); opt <= 20; opt++ {
		if opt == nbd.OptExportName || opt == nbd.OptAbort {
			if !handles(opt) {
				t.Errorf("handles(%v) = false", opt)
			}
			continue // they end the handshake: the cases below cannot ask
		}
		c := dialRaw(t, ts.addr)
		c.greet(nbd.ClientFlagFixedNewstyle)
		c.sendOption(opt, nil)
		r := c.optionReplies(opt)
		if unsup := r[len(r)-1].typ == nbd.RepErrUnsup; unsup == handles(opt) {
			t.Errorf("%v: the handshake answers %v, but handles says %v", opt, r[len(r)-1].typ, handles(opt))
		}
	}
}

// The spec reserves the context id in NBD_OPT_LIST_META_CONTEXT replies
// (SHOULD be zero); NBD_OPT_SET_META_CONTEXT gives the id requests use.
func TestMetaContextIDs(t *testing.T) {
	disk, _ := fileExport(t, "disk", 1<<20, false)
	ts := startServer(t, nil, disk)
	c := dialRaw(t, ts.addr)
	c.greet(nbd.ClientFlagFixedNewstyle)
	c.option(nbd.OptStructuredReply, nil)
	for _, tt := range []struct {
		opt  nbd.Option
		want uint32
	}{
		{nbd.OptListMetaContext, 0},
		{nbd.OptSetMetaContext, baseAllocationID},
	} {
		r := c.option(tt.opt, nbd.MetaContextRequest{Export: "disk", Queries: []string{nbd.MetaContextBaseAllocation}})
		var m nbd.MetaContext
		if r[0].typ != nbd.RepMetaContext || m.UnmarshalBinary(r[0].data) != nil {
			t.Fatalf("%v: %v %q", tt.opt, r[0].typ, r[0].data)
		}
		if m.ID != tt.want || m.Name != nbd.MetaContextBaseAllocation {
			t.Errorf("%v: context %d %q, want %d %q", tt.opt, m.ID, m.Name, tt.want, nbd.MetaContextBaseAllocation)
		}
	}
}

func exportsNamed(names ...string) []*Export {
	var out []*Export
	for _, n := range names {
		out = append(out, &Export{Name: n})
	}
	return out
}

// The unknown-export message stays within the spec's 4096 bytes, however
// many exports there are (an LVM host may have thousands), cut between
// names, and says how many it left out.
func TestUnknownExportMessage(t *testing.T) {
	many := make([]string, 1000)
	for i := range many {
		many[i] = fmt.Sprintf("vm-%04d-disk", i)
	}
	tests := []struct {
		name      string
		asked     string
		usable    []*Export
		want      string // when set, the whole message
		wantNames int    // else how many names it lists
	}{
		{name: "none usable", asked: "nope", want: `no export "nope" on this server`},
		{name: "a few", asked: "nope", usable: exportsNamed("a", "b\"c"),
			want: `no export "nope" on this server (exports: "a", "b\"c")`},
		// 42 bytes before the list, 14 for the first name, 16 for each
		// next: 252 names take 4072 bytes and leave room for ", and
		// 748 more)" (15); a 253rd would not.
		{name: "too many", asked: "nope", usable: exportsNamed(many...), wantNames: 252},
		{name: "name asked too long for a list", asked: strings.Repeat("x", 4050), usable: exportsNamed("a", "b"),
			want: `no export "` + strings.Repeat("x", 4050) + `" on this server`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := unknownExportMessage(tt.asked, tt.usable)
			if len(got) > nbd.MaxStringLength || !utf8.ValidString(got) {
				t.Fatalf("message of %d bytes (valid UTF-8: %v), want at most %d", len(got), utf8.ValidString(got), nbd.MaxStringLength)
			}
			if tt.want != "" {
				if got != tt.want {
					t.Errorf("message:\n got %q\nwant %q", got, tt.want)
				}
				return
			}
			listed := strings.Count(got, `"vm-`)
			wantEnd := fmt.Sprintf(`, and %d more)`, len(tt.usable)-listed)
			if listed != tt.wantNames || !strings.HasSuffix(got, wantEnd) {
				t.Errorf("message lists %d names and ends %q, want %d and %q", listed, got[len(got)-30:], tt.wantNames, wantEnd)
			}
			if len(got)+len(`, "vm-0999-disk"`) <= nbd.MaxStringLength {
				t.Errorf("message of %d bytes left out a name that fits", len(got))
			}
		})
	}
}

func TestTruncateString(t *testing.T) {
	tests := []struct {
		in   string
		max  int
		want string
	}{
		{"abc", 3, "abc"},
		{"abcd", 3, "abc"},
		{"ab€", 3, "ab"}, // € is 3 bytes: not half of it
		{"ab€", 5, "ab€"},
		{"€€", 4, "€"},
		{"€", 2, ""},
	}
	for _, tt := range tests {
		if got := truncateString(tt.in, tt.max); got != tt.want {
			t.Errorf("truncateString(%q, %d) = %q, want %q", tt.in, tt.max, got, tt.want)
		}
	}
}
