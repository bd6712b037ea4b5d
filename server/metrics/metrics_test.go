package metrics

import (
	"errors"
	"io"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lvnbd/lvnbd/nbd"
	"github.com/lvnbd/lvnbd/server"
)

type fakeBackend struct {
	server.Backend
	failed error
}

func (fakeBackend) Size() int64 { return 1 << 20 }

func (f fakeBackend) Failed() error { return f.failed }

func TestMetrics(t *testing.T) {
	reg := server.NewRegistry()
	// gone's volume is missing, its failure recorded before a restart; so
	// is that of the volume made before it under the name: one series.
	path := filepath.Join(t.TempDir(), "failures.json")
	record := `[{"export":"gone","description":"volume gone (lvnbd-id uuid-1)","error":"fdatasync: EIO","since":"2026-11-01T00:00:00Z"},
		{"export":"gone","description":"volume gone (lvnbd-id uuid-2)","error":"fdatasync: EIO","since":"2026-12-01T00:00:00Z"}]`
	if err := os.WriteFile(path, []byte(record), 0o600); err != nil {
		t.Fatal(err)
	}
	failures, err := server.LoadFailures(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	reg.KeepFailures(failures)
	if err := reg.Add(&server.Export{Name: "vm1", Backend: fakeBackend{}}); err != nil {
		t.Fatal(err)
	}
	if err := reg.Add(&server.Export{Name: "vm2", Backend: fakeBackend{failed: errors.New("fdatasync: EIO")}}); err != nil {
		t.Fatal(err)
	}
	fences, _ := server.LoadFences("")
	m := New(reg, fences)
	o := m.ForExport("vm1")
	o.Request(nbd.CmdRead, 4096, time.Millisecond, 0)
	o.Request(nbd.CmdRead, 4096, time.Millisecond, 0)
	o.Request(nbd.CmdWrite, 512, time.Millisecond, nbd.ENOSPC)
	o.Request(77, 0, time.Millisecond, nbd.EINVAL)

	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	for _, want := range []string{
		`lvnbd_requests_total{command="read",export="vm1"} 2`,
		`lvnbd_request_bytes_total{command="read",export="vm1"} 8192`,
		`lvnbd_request_bytes_total{command="write",export="vm1"} 0`,
		`lvnbd_request_errors_total{command="write",error="ENOSPC",export="vm1"} 1`,
		`lvnbd_requests_total{command="other",export="vm1"} 1`,
		`lvnbd_request_duration_seconds_count{command="read",export="vm1"} 2`,
		`lvnbd_export_size_bytes{export="vm1",read_only="false"} 1.048576e+06`,
		`lvnbd_connections{export="vm1"} 0`,
		`lvnbd_fenced_clients 0`,
		`lvnbd_export_failed{export="vm1"} 0`,
		`lvnbd_export_failed{export="vm2"} 1`,
		`lvnbd_export_failed{export="gone"} 1`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	if t.Failed() {
		t.Logf("metrics:\n%s", body)
	}
}
