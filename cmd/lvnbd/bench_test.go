package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lvnbd/lvnbd/bench"
	"github.com/lvnbd/lvnbd/internal/testpki"
	"github.com/lvnbd/lvnbd/server"
)

// benchJSON is the part of the --json report scripts rely on.
type benchJSON struct {
	Target     string  `json:"target"`
	Mode       string  `json:"mode"`
	BlockSize  int     `json:"block_size"`
	QueueDepth int     `json:"queue_depth"`
	Size       int64   `json:"size"`
	Seed       uint64  `json:"seed"`
	Seconds    float64 `json:"seconds"`
	Bytes      int64   `json:"bytes"`
	MBPerSec   float64 `json:"mb_per_s"`
	IOPS       float64 `json:"iops"`
	Flushed    bool    `json:"flushed"`
	Read       struct {
		Ops     int64 `json:"ops"`
		Bytes   int64 `json:"bytes"`
		Latency struct {
			P50  float64 `json:"p50"`
			P99  float64 `json:"p99"`
			P999 float64 `json:"p99_9"`
		} `json:"latency_us"`
	} `json:"read"`
	Write struct {
		Ops   int64 `json:"ops"`
		Bytes int64 `json:"bytes"`
	} `json:"write"`
	Verify *struct {
		OK                  bool   `json:"ok"`
		CheckedBytes        int64  `json:"checked_bytes"`
		FirstMismatchOffset *int64 `json:"first_mismatch_offset"`
	} `json:"verify"`
	Interrupted bool `json:"interrupted"`
}

func runLvnbd(tb testing.TB, args ...string) (stdout string, err error) {
	tb.Helper()
	stdout, _, err = runLvnbdContext(context.Background(), args...)
	return stdout, err
}

func runLvnbdContext(ctx context.Context, args ...string) (stdout, stderr string, err error) {
	var out, errOut bytes.Buffer
	cmd := newRootCmd(&out, &errOut)
	cmd.SetArgs(args)
	err = cmd.ExecuteContext(ctx)
	return out.String(), errOut.String(), err
}

func benchRun(tb testing.TB, args ...string) benchJSON {
	tb.Helper()
	out, err := runLvnbd(tb, append([]string{"bench", "--json", "--direct=false"}, args...)...)
	if err != nil {
		tb.Fatalf("lvnbd bench %v: %v\n%s", args, err, out)
	}
	var rep benchJSON
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		tb.Fatalf("lvnbd bench %v printed no JSON report: %v\n%s", args, err, out)
	}
	return rep
}

func TestBenchCommandWriteReadVerify(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.img")
	const size = 4 << 20

	w := benchRun(t, "--mode", "write", "--size", "4M", "--bs", "256k", "--verify", path)
	if w.Mode != "write" || w.Target != path || w.BlockSize != 256<<10 || w.QueueDepth != 1 || w.Size != size {
		t.Errorf("write report header: %+v", w)
	}
	if w.Bytes != size || w.Write.Bytes != size || w.Write.Ops != 16 || w.Read.Ops != 0 || !w.Flushed {
		t.Errorf("write: %d bytes in %d ops, flushed %v; want %d in 16, flushed", w.Write.Bytes, w.Write.Ops, w.Flushed, size)
	}
	if w.Verify == nil || !w.Verify.OK || w.Verify.CheckedBytes != size || w.Seed == 0 {
		t.Errorf("write verify %+v, seed %d", w.Verify, w.Seed)
	}

	// A read run checks the earlier run's pattern by its seed.
	r := benchRun(t, "--mode", "read", "--verify", "--seed", fmt.Sprint(w.Seed), path)
	if r.Read.Bytes != size || r.BlockSize != 1<<20 || r.Read.Ops != 4 || r.Verify == nil || !r.Verify.OK || r.MBPerSec <= 0 {
		t.Errorf("read: %+v verify %+v", r, r.Verify)
	}
	if !(r.Read.Latency.P50 > 0 && r.Read.Latency.P50 <= r.Read.Latency.P99 && r.Read.Latency.P99 <= r.Read.Latency.P999) {
		t.Errorf("read latency percentiles out of order: %+v", r.Read.Latency)
	}

	// Random defaults: 4 KiB at QD 32; --io bounds the run exactly.
	rr := benchRun(t, "--mode", "randread", "--io", "1M", path)
	if rr.BlockSize != 4096 || rr.QueueDepth != 32 || rr.Read.Bytes != 1<<20 || rr.Read.Ops != 256 || rr.Verify != nil {
		t.Errorf("randread defaults: %+v", rr)
	}

	// A wrong seed is stale data: the command fails and says where.
	out, err := runLvnbd(t, "bench", "--direct=false", "--mode", "read", "--verify", "--seed", fmt.Sprint(w.Seed+1), path)
	if err == nil || !strings.Contains(err.Error(), "mismatch at offset 0") || !strings.Contains(out, "verify FAILED") {
		t.Errorf("read with the wrong seed: err %v\n%s", err, out)
	}
}

func TestBenchCommandRefusals(t *testing.T) {
	dir := t.TempDir()
	full := filepath.Join(dir, "full.img")
	data := bytes.Repeat([]byte{0x5a}, 1<<20)
	if err := os.WriteFile(full, data, 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		args    []string
		wantErr string
	}{
		{args: []string{"--mode", "write", full}, wantErr: "refusing to write to non-empty file " + full + " (1.0 MiB, 1048576 bytes)"},
		{args: []string{"--mode", "randrw", "--runtime", "1s", full}, wantErr: "add --force"},
		{args: []string{"--mode", "read", "--verify", full}, wantErr: "give its --seed"},
		{args: []string{"--mode", "scan", full}, wantErr: "want one of read, write"},
		{args: []string{"--bs", "4X", full}, wantErr: "--bs"},
		{args: []string{"--mode", "read", filepath.Join(dir, "missing.img")}, wantErr: "does not exist"},
		{args: []string{"--mode", "read", full, full}, wantErr: "only NBD URIs"},
		{args: []string{"--mode", "read", "--io", "1M", full}, wantErr: "bounds random modes only; a read run covers its region once: give the region instead (--size 1048576)"},
		{args: []string{"--mode", "randread", "--io", "1000", full}, wantErr: "less than one 4.0 KiB request, so the run would do nothing: give --io of at least the block size (--bs)"},
		{args: []string{"--mode", "read", "--conns", "2", full}, wantErr: "--conns 2: " + full + " is not an NBD export"},
		{args: []string{"--mode", "write", "--seed", "0", "--force", full}, wantErr: "--seed 0: want a positive seed"},
		{args: []string{"--mode", "randread", "--fua", "--io", "1M", full}, wantErr: "FUA (--fua) makes writes durable, and a randread run writes nothing"},
		{args: []string{"--mode", "read", "--fua", full}, wantErr: "a read run writes nothing"},
		{args: []string{"--mode", "randwrite", "--rwmix-read", "70", "--io", "1M", "--force", full}, wantErr: "--rwmix-read sets the mix of randrw only; a randwrite run would ignore it"},
		{args: []string{"--mode", "read", "--rwmix-read", "50", full}, wantErr: "--rwmix-read sets the mix of randrw only"},
		{args: []string{"--mode", "read", "--timeout", "-1s", full}, wantErr: "timeout must not be negative"},
		{args: []string{}, wantErr: "requires at least 1 arg"},
		{args: []string{"--mode", "read", "--tls-ca", full, full}, wantErr: "--tls-ca, --tls-cert, --tls-key and --tls-crl are for nbds:// URIs, and " + full + " is not an NBD URI"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			out, err := runLvnbd(t, append([]string{"bench", "--direct=false"}, tt.args...)...)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("err %v, want one containing %q\n%s", err, tt.wantErr, out)
			}
		})
	}
	if got, _ := os.ReadFile(full); !bytes.Equal(got, data) {
		t.Error("a refused run changed the file")
	}
	if _, err := os.Stat(filepath.Join(dir, "missing.img")); err == nil {
		t.Error("a read run created a file")
	}
}

// Several URIs are one export only where the server lets connections see
// each other's writes (CAN_MULTI_CONN).
func TestBenchSeveralURIsNeedMultiConn(t *testing.T) {
	uri := nbdkitURI(t, "--filter=multi-conn", "memory", "size=1M", "multi-conn-mode=disable")
	var out, errOut bytes.Buffer
	root := newRootCmd(&out, &errOut)
	root.SetArgs([]string{"bench", "--mode", "read", uri, uri})
	err := root.ExecuteContext(context.Background())
	if err == nil || !strings.Contains(err.Error(), "does not advertise CAN_MULTI_CONN") {
		t.Errorf("bench over two URIs of an export without multi-conn: %v", err)
	}
	// One URI is fine: one connection, and stderr says so.
	errOut.Reset()
	root = newRootCmd(&out, &errOut)
	root.SetArgs([]string{"bench", "--mode", "read", "--conns", "4", uri})
	if err := root.ExecuteContext(context.Background()); err != nil {
		t.Errorf("bench over one URI of it: %v", err)
	}
	if want := uri + " does not advertise CAN_MULTI_CONN: using 1 connection, not 4"; !strings.Contains(errOut.String(), want) {
		t.Errorf("stderr %q does not say %q", errOut.String(), want)
	}
}

// Ctrl-C and SIGTERM cancel the context: the report of what completed is
// still printed, and the exit status says the run did not finish.
func TestBenchCommandInterruptedFails(t *testing.T) {
	path := filepath.Join(t.TempDir(), "full.img")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	out, _, err := runLvnbdContext(ctx, "bench", "--json", "--direct=false", "--mode", "write", "--verify", "--force", path)
	if !errors.Is(err, bench.ErrInterrupted) || !errors.Is(err, bench.ErrVerifyIncomplete) {
		t.Errorf("interrupted verify run: %v, want ErrInterrupted and ErrVerifyIncomplete", err)
	}
	var rep benchJSON
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("no JSON report after the interruption: %v\n%s", err, out)
	}
	if !rep.Interrupted || rep.Verify == nil || rep.Verify.OK {
		t.Errorf("report: interrupted %v, verify %+v; want interrupted, verify not ok", rep.Interrupted, rep.Verify)
	}
}

// A run that fails before writing anything to the file it created removes
// it, so the next run needs no --force.
func TestBenchCommandLeavesNoFileOnFailure(t *testing.T) {
	path := filepath.Join(t.TempDir(), "new.img")
	// O_DIRECT (the default) needs a size of whole sectors.
	if _, err := runLvnbd(t, "bench", "--mode", "write", "--size", "1000", path); err == nil {
		t.Error("a 1000-byte direct write run succeeded")
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the refused run left %s: %v", path, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, _, err := runLvnbdContext(ctx, "bench", "--direct=false", "--mode", "write", "--size", "1M", path); !errors.Is(err, bench.ErrInterrupted) {
		t.Errorf("a run interrupted before its first write: %v", err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the run interrupted before writing left %s: %v", path, err)
	}
	w := benchRun(t, "--mode", "write", "--size", "1M", path)
	if w.Write.Bytes != 1<<20 {
		t.Errorf("the next run wrote %d bytes, want 1 MiB", w.Write.Bytes)
	}
}

// A forced run says, before it writes, what it writes over.
func TestBenchCommandForcedOverwriteSaysSo(t *testing.T) {
	path := filepath.Join(t.TempDir(), "full.img")
	if err := os.WriteFile(path, make([]byte, 2<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	_, stderr, err := runLvnbdContext(context.Background(), "bench", "--direct=false", "--mode", "write", "--size", "1M", "--force", path)
	if err != nil {
		t.Fatal(err)
	}
	if want := "overwriting file " + path + ": 1048576 bytes (1.0 MiB) from offset 0\n"; stderr != want {
		t.Errorf("stderr %q, want %q", stderr, want)
	}
}

// Each URI is checked, and the report names them all.
func TestBenchCommandSeveralURIs(t *testing.T) {
	rw := nbdkitURI(t, "memory", "size=1M")
	ro := nbdkitURI(t, "-r", "memory", "size=1M")
	_, err := runLvnbd(t, "bench", "--mode", "write", "--force", rw, ro)
	if err == nil || !strings.Contains(err.Error(), ro+" is a read-only export") {
		t.Errorf("write over a writable and a read-only URI: %v, want a refusal naming %s", err, ro)
	}
	r := benchRun(t, "--mode", "read", rw, rw)
	if want := rw + " " + rw; r.Target != want {
		t.Errorf("report target %q, want %q", r.Target, want)
	}
}

// --help says what the time of a writing run includes and what --verify
// checks.
func TestBenchHelpSaysWhatIsTimedAndVerified(t *testing.T) {
	out, err := runLvnbd(t, "bench", "--help")
	if err != nil {
		t.Fatal(err)
	}
	help := strings.Join(strings.Fields(out), " ")
	for _, want := range []string{
		"Every mode that writes (write, randwrite, randrw) ends with a flush, which counts in the time",
		"after the closing flush, reads back every block written",
		"with --direct=false the page cache is dropped first",
		"the exit status is then non-zero",
		"--timeout (default 30s, as for 'lvnbd info'; 0: none) bounds every request",
		"A second Ctrl-C ends lvnbd at once.",
		"--fua with read modes, --rwmix-read with modes other than randrw",
	} {
		if !strings.Contains(help, want) {
			t.Errorf("bench --help does not say %q", want)
		}
	}
}

// The first Ctrl-C asks for an orderly exit (bench prints the report of
// what completed); a second one, for when that exit hangs, kills lvnbd at
// once. It runs in a child process, which the second signal must kill.
func TestSecondInterruptKills(t *testing.T) {
	if os.Getenv("LVNBD_TEST_INTERRUPT_CHILD") == "1" {
		ctx, stop := interruptContext(context.Background())
		defer stop()
		syscall.Kill(os.Getpid(), syscall.SIGINT)
		<-ctx.Done()
		syscall.Kill(os.Getpid(), syscall.SIGINT)
		// Not synchronisation: the window in which the signal must
		// have killed the process.
		time.Sleep(10 * time.Second)
		fmt.Println("survived the second SIGINT")
		os.Exit(3)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestSecondInterruptKills$", "-test.count=1")
	cmd.Env = append(os.Environ(), "LVNBD_TEST_INTERRUPT_CHILD=1")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("child: %v, want it killed by SIGINT\n%s", err, out)
	}
	if ws, ok := ee.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGINT {
		t.Errorf("child: %v, want it killed by the second SIGINT\n%s", err, out)
	}
}

// An export's minimum block size is no matter of direct I/O: the refusal
// names it, and --direct=false (which changes nothing for NBD) is not
// offered.
func TestBenchCommandExportAlignment(t *testing.T) {
	uri := nbdkitURI(t, "--filter=blocksize-policy", "memory", "size=1M", "blocksize-minimum=4096")
	tests := []struct {
		args    []string
		wantErr string
	}{
		{args: []string{"--bs", "512"}, wantErr: "block size 512 is not a multiple of 4096, the export's minimum block size: give a --bs that is a multiple of it"},
		{args: []string{"--bs", "512", "--direct=false"}, wantErr: "the export's minimum block size: give a --bs"},
		{args: []string{"--size", "6000"}, wantErr: "size 6000 is not a multiple of 4096, the export's minimum block size: give a --size that is a multiple of it"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			_, err := runLvnbd(t, append([]string{"bench", "--mode", "read"}, append(tt.args, uri)...)...)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || strings.Contains(err.Error(), "direct") {
				t.Errorf("err %v, want one containing %q and no word of direct I/O", err, tt.wantErr)
			}
		})
	}
}

// A server that stops answering cannot hang bench: the run ends after
// --timeout with an error naming the server and the request, or at once
// on Ctrl-C, and the connections are closed without waiting out the 30 s
// drain for requests nobody waits for any more.
func TestBenchCommandStalledServer(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		cancel  time.Duration // Ctrl-C this long into the run; 0: none
		wantErr error
		wantMsg string
	}{
		{name: "timeout", args: []string{"--timeout", "200ms"}, wantErr: bench.ErrTimeout,
			wantMsg: "no reply from URI within 200ms to a read of 4.0 KiB at offset "},
		{name: "interrupt", args: []string{"--timeout", "0"}, cancel: 300 * time.Millisecond, wantErr: bench.ErrInterrupted},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// A server each: the first may not outlive being hung up on.
			uri := nbdkitStalling(t, "--filter=delay", "memory", "size=1M", "delay-read=600")
			if tt.wantMsg != "" {
				tt.wantMsg = strings.ReplaceAll(tt.wantMsg, "URI", uri)
			}
			ctx := context.Background()
			if tt.cancel > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tt.cancel)
				defer cancel()
			}
			start := time.Now()
			out, _, err := runLvnbdContext(ctx, append([]string{"bench", "--mode", "randread", "--qd", "4", "--runtime", "10m"}, append(tt.args, uri)...)...)
			took := time.Since(start)
			if !errors.Is(err, tt.wantErr) || !strings.Contains(fmt.Sprint(err), tt.wantMsg) {
				t.Errorf("err %v, want %v containing %q\n%s", err, tt.wantErr, tt.wantMsg, out)
			}
			if !strings.Contains(out, "randread "+uri) {
				t.Errorf("no report of what completed:\n%s", out)
			}
			// Coarse on purpose: what it tells apart is an end soon
			// after the timeout from one that waits out the drain.
			if took > 20*time.Second {
				t.Errorf("bench took %v to end", took)
			}
		})
	}
}

// TestBenchCommandOverTLS: a verified write and read over nbds://, on two
// connections, with the certificates named by flags and by the URI.
func TestBenchCommandOverTLS(t *testing.T) {
	pki, err := testpki.New(t.TempDir(), "dom0-a")
	if err != nil {
		t.Fatal(err)
	}
	base, _ := infoTestServerWith(t, pki.ServerConfig(), server.Access{TLS: server.TLSRequired, AllowNames: []string{"dom0-a"}})
	uri := strings.Replace(base, "nbd://", "nbds://", 1) + "/vm1"
	file := func(name string) string { return filepath.Join(pki.Dir, name) }

	w := benchRun(t, "--mode", "write", "--force", "--size", "1M", "--bs", "64k", "--qd", "4", "--conns", "2", "--verify",
		"--tls-ca", file("ca-cert.pem"), "--tls-cert", file("client-cert.pem"), "--tls-key", file("client-key.pem"), uri)
	if w.Write.Bytes != 1<<20 || w.Verify == nil || !w.Verify.OK {
		t.Fatalf("write over TLS: %+v, verify %+v", w, w.Verify)
	}
	r := benchRun(t, "--mode", "read", "--size", "1M", "--verify", "--seed", fmt.Sprint(w.Seed), uri+"?tls-certificates="+pki.Dir)
	if r.Read.Bytes != 1<<20 || r.Verify == nil || !r.Verify.OK {
		t.Fatalf("read over TLS: %+v, verify %+v", r, r.Verify)
	}
	_, err = runLvnbd(t, "bench", "--mode", "read", "--size", "1M", uri)
	if err == nil || !strings.Contains(err.Error(), "give the CA that signed the server's certificate") {
		t.Fatalf("bench without the CA: %v, want the hint to give it", err)
	}
}
