package kernel

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lvnbd/lvnbd/client"
	"github.com/lvnbd/lvnbd/nbd"
	"github.com/lvnbd/lvnbd/server"
)

// acceptHook calls onAccept with the count of connections accepted so far,
// before the server sees the newest.
type acceptHook struct {
	net.Listener
	n        int
	onAccept func(n int)
}

func (l *acceptHook) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n++
		l.onAccept(l.n)
	}
	return c, err
}

// volumeExport opens a file export named vm1 whose description carries the
// volume ID id.
func volumeExport(t *testing.T, path, id string) *server.Export {
	t.Helper()
	e, err := server.OpenExport(server.ExportSpec{Name: "vm1", Path: path})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Backend.Close() })
	e.Description = nbd.WithID("volume vm1", id)
	return e
}

// The connections DialSockets gives the kernel are all to one volume: one
// made anew under the export's name between two of them is refused.
func TestDialSocketsRefusesAVolumeMadeAnewBetweenConnections(t *testing.T) {
	for _, tt := range []struct {
		name string
		anew bool
	}{
		{name: "same volume"},
		{name: "made anew", anew: true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "vm1.img")
			if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
				t.Fatal(err)
			}
			reg := server.NewRegistry()
			if err := reg.Add(volumeExport(t, path, "uuid-1")); err != nil {
				t.Fatal(err)
			}
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			hooked := &acceptHook{Listener: ln, onAccept: func(n int) {
				if n == 2 && tt.anew {
					if _, _, err := reg.Remove("vm1"); err != nil {
						t.Error(err)
					}
					if err := reg.Add(volumeExport(t, path, "uuid-2")); err != nil {
						t.Error(err)
					}
				}
			}}
			ctx, cancel := context.WithCancel(context.Background())
			served := make(chan error, 1)
			go func() { served <- server.New(&server.Config{Exports: reg}).Serve(ctx, hooked) }()
			defer func() {
				cancel()
				if err := <-served; err != nil {
					t.Errorf("server: %v", err)
				}
			}()
			u, err := client.ParseURI("nbd://" + ln.Addr().String() + "/vm1")
			if err != nil {
				t.Fatal(err)
			}
			files, info, err := DialSockets(context.Background(), nil, u, 3)
			defer CloseSockets(files)
			if !tt.anew {
				if err != nil || len(files) != 3 || info.ID() != "uuid-1" {
					t.Errorf("DialSockets = %d files, ID %q, %v; want 3 to uuid-1", len(files), info.ID(), err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), "changed between connections") ||
				!strings.Contains(err.Error(), `volume id "uuid-1"`) || !strings.Contains(err.Error(), `volume id "uuid-2"`) {
				t.Errorf("DialSockets across a volume made anew: %v", err)
			}
			if files != nil {
				t.Errorf("DialSockets returned %d sockets with its error", len(files))
			}
		})
	}
}
