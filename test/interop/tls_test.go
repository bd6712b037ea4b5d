package interop

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lvnbd/lvnbd/internal/testpki"
)

// TLS with the clients nobody here wrote: libnbd's nbdinfo and qemu, both
// on GnuTLS, with and without a client certificate.
func TestTLS(t *testing.T) {
	requireInterop(t, "nbdinfo", "qemu-img", "qemu-io")
	pkiDir := t.TempDir()
	pki, err := testpki.New(pkiDir, "dom0-a")
	if err != nil {
		t.Fatal(err)
	}
	// A second directory with the CA but no client certificate.
	anonDir := t.TempDir()
	ca, err := os.ReadFile(filepath.Join(pki.Dir, "ca-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(anonDir, "ca-cert.pem"), ca, 0o600); err != nil {
		t.Fatal(err)
	}
	img := sparseFile(t, filepath.Join(fastDir(t), "secure.img"), 16<<20)
	s := startServer(t, serverOpts{
		exports: []string{"secure=" + img},
		args: []string{"--tls", "required",
			"--tls-cert", filepath.Join(pkiDir, "server-cert.pem"), "--tls-key", filepath.Join(pkiDir, "server-key.pem"),
			"--tls-ca", filepath.Join(pkiDir, "ca-cert.pem"), "--allow-name", "dom0-a"},
	})
	tlsURI := func(dir string) string {
		return strings.Replace(s.uri("secure"), "nbd://", "nbds://", 1) + "?tls-certificates=" + dir
	}

	t.Run("nbdinfo with a client certificate", func(t *testing.T) {
		out := mustRun(t, "nbdinfo", "--json", tlsURI(pkiDir))
		if !strings.Contains(out, `"export-size": 16777216`) {
			t.Fatalf("nbdinfo over TLS:\n%s", out)
		}
		if !strings.Contains(mustRun(t, "nbdinfo", tlsURI(pkiDir)), "TLS") {
			t.Error("nbdinfo does not report TLS in use")
		}
	})
	t.Run("nbdinfo without a client certificate is refused", func(t *testing.T) {
		out, err := run(t, "nbdinfo", tlsURI(anonDir))
		if err == nil {
			t.Fatalf("a client without a certificate got in:\n%s", out)
		}
		if !s.waitLog("a client certificate with an allowed name is required", 10*time.Second) {
			t.Errorf("no log line names the refusal; output: %s", out)
		}
	})
	t.Run("plain text is refused", func(t *testing.T) {
		if out, err := run(t, "nbdinfo", s.uri("secure")); err == nil {
			t.Fatalf("a plain-text client got into a TLS-only export:\n%s", out)
		}
	})
	t.Run("a revoked client certificate is refused", func(t *testing.T) {
		// The server's CRL, kept apart from the client's directory,
		// where GnuTLS would read it as the list for the server's
		// certificate.
		if err := pki.WriteCRL(pki.Client.Leaf); err != nil {
			t.Fatal(err)
		}
		crl := filepath.Join(t.TempDir(), "revoked.pem")
		if err := os.Rename(filepath.Join(pki.Dir, "ca-crl.pem"), crl); err != nil {
			t.Fatal(err)
		}
		revoking := startServer(t, serverOpts{
			exports: []string{"secure=" + img},
			args: []string{"--tls", "required",
				"--tls-cert", filepath.Join(pkiDir, "server-cert.pem"), "--tls-key", filepath.Join(pkiDir, "server-key.pem"),
				"--tls-ca", filepath.Join(pkiDir, "ca-cert.pem"), "--tls-crl", crl},
		})
		uri := strings.Replace(revoking.uri("secure"), "nbd://", "nbds://", 1) + "?tls-certificates=" + pkiDir
		out, err := run(t, "nbdinfo", uri)
		if err == nil {
			t.Fatalf("a client with a revoked certificate got in:\n%s", out)
		}
		if !revoking.waitLog(`the client's certificate \"CN=dom0-a\" (serial 3) is revoked by the CRL `+crl, 10*time.Second) {
			t.Errorf("no log line names the revoked certificate; output: %s", out)
		}
		// The server without the CRL still lets the same client in.
		mustRun(t, "nbdinfo", tlsURI(pkiDir))
	})
	t.Run("qemu writes and reads over TLS", func(t *testing.T) {
		obj := "tls-creds-x509,id=tls0,endpoint=client,dir=" + pkiDir
		opts := "driver=nbd,host=127.0.0.1,port=" + itoa(s.port) + ",export=secure,tls-creds=tls0"
		out := mustRun(t, "qemu-io", "--object", obj, "--image-opts", opts,
			"-c", "write -P 0x5a 4096 65536", "-c", "read -P 0x5a 4096 65536")
		if strings.Contains(out, "Pattern verification failed") {
			t.Fatalf("qemu-io over TLS:\n%s", out)
		}
		if got := readAt(t, img, 4096, 65536); strings.Count(string(got), "\x5a") != 65536 {
			t.Fatal("the backing file does not hold what qemu wrote over TLS")
		}
		info := mustRun(t, "qemu-img", "info", "--object", obj, "--image-opts", opts)
		if !strings.Contains(info, "16 MiB") {
			t.Fatalf("qemu-img info over TLS:\n%s", info)
		}
	})
}

func itoa(n int) string { return strconv.Itoa(n) }
