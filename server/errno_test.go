package server

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"unicode/utf8"

	"github.com/lvnbd/lvnbd/nbd"
	"github.com/lvnbd/lvnbd/server/backend"
)

func TestErrnoOf(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want nbd.Errno
	}{
		{"ENOSPC of the request's own write", fmt.Errorf("pwrite /srv/vm1.img at 0: %w", syscall.ENOSPC), nbd.ENOSPC},
		{"EDQUOT", syscall.EDQUOT, nbd.ENOSPC},
		{"EROFS", syscall.EROFS, nbd.EPERM},
		{"EINVAL", syscall.EINVAL, nbd.EINVAL},
		{"not fast", backend.ErrNotFast, nbd.ENOTSUP},
		{"no errno", errors.New("odd"), nbd.EIO},
		// A failed export fails every request with EIO, whatever its
		// first failure was: the ENOSPC of one fdatasync is not this
		// read's.
		{"write-back failed with ENOSPC", &backend.WriteBackError{Path: "/srv/vm1.img",
			Err: fmt.Errorf("fdatasync /srv/vm1.img: %w", syscall.ENOSPC)}, nbd.EIO},
		{"write-back failed with EROFS, wrapped", fmt.Errorf("reading: %w",
			&backend.WriteBackError{Path: "/dev/vg0/vm1", Err: syscall.EROFS}), nbd.EIO},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := errnoOf(tt.err); got != tt.want {
				t.Errorf("errnoOf(%v) = %v, want %v", tt.err, got, tt.want)
			}
		})
	}
}

// After a write-back failed with ENOSPC, every request of the export is
// answered EIO: an ENOSPC would tell the client the request may succeed once
// space is freed (qemu pauses the VM and retries it; base:allocation
// promises no ENOSPC for allocated extents). The original error stays in the
// reply's message and in lvnbd status.
func TestFailedExportAnswersEIO(t *testing.T) {
	disk, path := fileExport(t, "disk", 1<<20, false)
	ts := startServer(t, nil, disk)
	const cause = "no space left on device"
	disk.Backend.(*backend.File).MarkFailed(fmt.Errorf("fdatasync %s: %w", path, syscall.ENOSPC))

	c := dialRaw(t, ts.addr)
	c.open("disk", true)
	for i, req := range []nbd.RequestHeader{
		{Command: nbd.CmdRead, Length: 512},
		{Command: nbd.CmdWrite, Length: 512},
		{Command: nbd.CmdFlush},
	} {
		req.Handle = uint64(i + 1)
		var payload []byte
		if req.Command == nbd.CmdWrite {
			payload = make([]byte, req.Length)
		}
		c.request(req, payload)
		res := c.reply(0)
		if res.errno != nbd.EIO || !strings.Contains(res.msg, cause) {
			t.Errorf("%v on the failed export: errno %v, message %q; want %v and a message saying %q",
				req.Command, res.errno, res.msg, nbd.EIO, cause)
		}
	}
	if st := ts.reg.Status(); len(st) != 1 || !strings.Contains(st[0].Failed, cause) {
		t.Errorf("status %+v, want the export failed with %q", st, cause)
	}
}

// A structured error's message is cut to the spec's 4096 bytes at the start
// of a UTF-8 sequence, not in the middle of a character.
func TestErrorReplyMessageStaysUTF8(t *testing.T) {
	c := &conn{sess: &session{structured: true}}
	var r reply
	msg := strings.Repeat("é", nbd.MaxStringLength) // 2 bytes each, after one of 1: 4096 falls inside one
	c.errorReply(&r, nbd.RequestHeader{Handle: 7}, nbd.EIO, "x"+msg)
	b := bytes.Join(r.parts, nil)
	var chunk nbd.ErrorChunk
	if err := chunk.UnmarshalBinary(nbd.ReplyError, b[nbd.StructuredHeaderSize:]); err != nil {
		t.Fatal(err)
	}
	if len(chunk.Message) > nbd.MaxStringLength || !utf8.ValidString(chunk.Message) {
		t.Errorf("message of %d bytes, valid UTF-8 %v; want at most %d, valid", len(chunk.Message),
			utf8.ValidString(chunk.Message), nbd.MaxStringLength)
	}
}
