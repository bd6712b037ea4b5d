package server

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/lvnbd/lvnbd/nbd"
)

// handshakeBytes is what a well-behaved client sends to reach transmission
// on export "disk", with or without structured replies.
func handshakeBytes(structured bool) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(nbd.ClientFlagFixedNewstyle|nbd.ClientFlagNoZeroes))
	opt := func(o nbd.Option, msg interface{ AppendBinary([]byte) ([]byte, error) }) {
		var data []byte
		if msg != nil {
			data, _ = msg.AppendBinary(nil)
		}
		b, _ = nbd.OptionHeader{Option: o, Length: uint32(len(data))}.AppendBinary(b)
		b = append(b, data...)
	}
	if structured {
		opt(nbd.OptStructuredReply, nil)
		opt(nbd.OptSetMetaContext, nbd.MetaContextRequest{Export: "disk", Queries: []string{nbd.MetaContextBaseAllocation}})
	}
	opt(nbd.OptGo, nbd.InfoRequest{Name: "disk"})
	return b
}

func req(r nbd.RequestHeader) []byte {
	b, _ := r.AppendBinary(nil)
	return b
}

func TestHostileClients(t *testing.T) {
	disk, _ := fileExport(t, "disk", 64<<20, false)
	ts := startServer(t, nil, disk)
	tests := []struct {
		name string
		send []byte
	}{
		// Found by the client's interop tests: a structured read over the
		// maximum payload used to index past the buffer pools and panic.
		{"structured read of 40 MiB", append(handshakeBytes(true), req(nbd.RequestHeader{Command: nbd.CmdRead, Length: 40 << 20})...)},
		{"simple read of 40 MiB", append(handshakeBytes(false), req(nbd.RequestHeader{Command: nbd.CmdRead, Length: 40 << 20})...)},
		{"garbage instead of flags", bytes.Repeat([]byte{0xff}, 1000)},
		{"truncated client flags", []byte{0, 0}},
		{"truncated option header", append(binary.BigEndian.AppendUint32(nil, 1), "IHAVEOPT\x00\x00"...)},
		{"go with a 4 GiB name length", append(binary.BigEndian.AppendUint32(nil, 1),
			"IHAVEOPT\x00\x00\x00\x07\x00\x00\x00\x08\xff\xff\xff\xff\x00\x00\x00\x00"...)},
		{"bad request magic", append(handshakeBytes(false), bytes.Repeat([]byte{0x5a}, nbd.RequestHeaderSize)...)},
		{"write of 4 GiB", append(handshakeBytes(true), req(nbd.RequestHeader{Command: nbd.CmdWrite, Length: 0xffffffff})...)},
		{"write with a payload-length flag", append(handshakeBytes(false), req(nbd.RequestHeader{Command: nbd.CmdWrite, Flags: nbd.CmdFlagPayloadLen, Length: 16})...)},
		{"write truncated mid-payload", append(handshakeBytes(false), req(nbd.RequestHeader{Command: nbd.CmdWrite, Length: 4096})[:nbd.RequestHeaderSize+0]...)},
		{"read of 4 GiB at an overflowing offset", append(handshakeBytes(true),
			req(nbd.RequestHeader{Command: nbd.CmdRead, Offset: 1<<64 - 1, Length: 0xffffffff})...)},
		{"block status of 4 GiB", append(handshakeBytes(true),
			req(nbd.RequestHeader{Command: nbd.CmdBlockStatus, Length: 0xffffffff})...)},
		{"disconnect with trailing junk", append(append(handshakeBytes(false), req(nbd.RequestHeader{Command: nbd.CmdDisc})...), "junk"...)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			nc, err := net.Dial("tcp", ts.addr)
			if err != nil {
				t.Fatal(err)
			}
			defer nc.Close()
			nc.SetDeadline(time.Now().Add(10 * time.Second))
			nc.Write(tt.send)
			nc.(*net.TCPConn).CloseWrite()
			// Whatever it answers, the server must end the conversation.
			if _, err := io.Copy(io.Discard, nc); err != nil {
				t.Fatalf("server did not close the connection: %v", err)
			}
		})
	}
	// A well-behaved client is served as before.
	c := dialRaw(t, ts.addr)
	c.open("disk", true)
	c.request(nbd.RequestHeader{Command: nbd.CmdWrite, Handle: 1, Offset: 512, Length: 3}, []byte("abc"))
	if res := c.reply(0); res.errno != 0 {
		t.Fatalf("write after hostile clients: %v", res.errno)
	}
	c.request(nbd.RequestHeader{Command: nbd.CmdRead, Handle: 2, Offset: 512, Length: 3}, nil)
	if got := assemble(t, c.reply(3), 512, 3); string(got) != "abc" {
		t.Fatalf("read back %q", got)
	}
}

// FuzzConnection feeds arbitrary bytes to a connection, after a valid
// handshake or from the first byte, and requires the server to end it
// without panicking or hanging.
func FuzzConnection(f *testing.F) {
	// On tmpfs, so that small writes reach the reader's own path too.
	disk, _ := fileExportIn(f, memoryDir(f), "disk", 1<<20, false)
	reg := NewRegistry()
	reg.Add(disk)
	s := New(&Config{Exports: reg, HandshakeTimeout: time.Second, DrainTimeout: time.Second})

	f.Add(false, []byte{})
	f.Add(true, req(nbd.RequestHeader{Command: nbd.CmdRead, Length: 4096}))
	f.Add(true, req(nbd.RequestHeader{Command: nbd.CmdBlockStatus, Length: 1 << 20}))
	f.Add(false, append(req(nbd.RequestHeader{Command: nbd.CmdWrite, Length: 4, Flags: nbd.CmdFlagFUA}), "abcd"...))
	f.Add(false, req(nbd.RequestHeader{Command: nbd.CmdWriteZeroes, Offset: 4096, Length: 8192, Flags: nbd.CmdFlagFastZero}))
	f.Add(true, req(nbd.RequestHeader{Command: nbd.CmdRead, Flags: nbd.CmdFlagDF, Length: 1 << 20}))
	f.Fuzz(func(t *testing.T, structured bool, data []byte) {
		in := data
		if len(data) > 0 && data[0]&1 == 1 {
			in = append(handshakeBytes(structured), data[1:]...)
		}
		client, server := net.Pipe()
		done := make(chan struct{})
		go func() {
			s.handle(context.Background(), server, peer{})
			close(done)
		}()
		go io.Copy(io.Discard, client)
		client.SetWriteDeadline(time.Now().Add(5 * time.Second))
		client.Write(in)
		client.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("connection handler did not return")
		}
	})
}
