package interop

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestFioRandomWriteVerify runs fio's nbd engine (libnbd): 4 KiB random
// writes at queue depth 32 over the whole export, then reads every block
// back and checks its crc32c.
func TestFioRandomWriteVerify(t *testing.T) {
	requireInterop(t, "fio")
	if err := exec.Command("fio", "--enghelp=nbd").Run(); err != nil {
		missing(t, "fio has no nbd ioengine (fio --enghelp=nbd: %v)", err)
	}
	const size = 64 << 20
	dir := fastDir(t)
	disk := sparseFile(t, filepath.Join(dir, "disk.img"), size)
	s := startServer(t, serverOpts{exports: []string{"disk=" + disk}})

	// fio prints a banner on stdout before the JSON, so the report goes to
	// a file; --verify_state_save=0 keeps it from leaving a state file in
	// the package directory.
	report := filepath.Join(t.TempDir(), "fio.json")
	out := mustRun(t, "fio",
		"--name=randwrite-verify", "--ioengine=nbd", "--uri="+s.uri("disk"),
		"--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=64M",
		"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
		"--runtime=60", "--output-format=json", "--output="+report)
	b, err := os.ReadFile(report)
	if err != nil {
		t.Fatalf("reading fio's JSON report: %v\nfio output:\n%s", err, out)
	}
	var rep struct {
		Jobs []struct {
			Name  string `json:"jobname"`
			Error int    `json:"error"`
			Write struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"write"`
			Read struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"read"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatalf("decoding fio's JSON report: %v\n%s", err, b)
	}
	if len(rep.Jobs) != 1 {
		t.Fatalf("fio reported %d jobs, want 1:\n%s", len(rep.Jobs), b)
	}
	j := rep.Jobs[0]
	if j.Error != 0 {
		t.Errorf("fio job %s: error %d, want 0\n%s", j.Name, j.Error, out)
	}
	// Every block written once, and every block read back for verification.
	if j.Write.IOBytes != size {
		t.Errorf("fio wrote %d bytes, want %d", j.Write.IOBytes, size)
	}
	if j.Read.IOBytes != size {
		t.Errorf("fio verified %d bytes, want %d", j.Read.IOBytes, size)
	}
}
