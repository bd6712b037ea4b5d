package daemon

import (
	"crypto/x509"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/lvnbd/lvnbd/client"
	"github.com/lvnbd/lvnbd/config"
	"github.com/lvnbd/lvnbd/internal/testpki"
)

// TestReloadReadsTheCRLAgain: a reload takes a client certificate back
// (tls.crl) for connections made from then on, and gives it back; a reload
// with a CRL that cannot be read is rejected, and the running CRL stays.
func TestReloadReadsTheCRLAgain(t *testing.T) {
	dir := t.TempDir()
	pki, err := testpki.New(dir, "dom0-a")
	if err != nil {
		t.Fatal(err)
	}
	crl := filepath.Join(t.TempDir(), "crl.pem")
	writeCRL := func(revoked ...*x509.Certificate) {
		t.Helper()
		b, err := pki.SignCRL(crlOf(revoked))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(crl, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	writeCRL(pki.Server.Leaf) // another certificate
	sock := filepath.Join(dir, "nbd.sock")
	a := config.Export{Name: "a", Path: sparse(t, "a.img", 1<<20), Access: config.Access{TLS: "required", AllowNames: []string{"dom0-a"}}}
	cfg := testConfig(sock, a)
	cfg.TLS = config.TLS{Cert: filepath.Join(dir, "server-cert.pem"), Key: filepath.Join(dir, "server-key.pem"),
		CA: filepath.Join(dir, "ca-cert.pem"), CRL: crl, Default: "required"}
	d := startDaemon(t, cfg)
	defer d.stop()
	uri := "nbds+unix:///a?socket=" + sock + "&tls-hostname=localhost"
	opts := &client.Options{TLS: pki.ClientConfig(true)}
	info := func() error { _, err := client.Info(d.ctx, uri, opts); return err }
	waitFor(t, "the server", func() bool { return info() == nil })

	writeCRL(pki.Client.Leaf)
	if err := d.reload(cfg); err != nil {
		t.Fatal(err)
	}
	if err := info(); err == nil {
		t.Fatal("the revoked client got in after the reload")
	}

	if err := os.WriteFile(crl, []byte("not a CRL\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := d.reload(cfg); err == nil {
		t.Fatal("a reload with a CRL that holds none was accepted")
	}
	if err := info(); err == nil {
		t.Fatal("the revoked client got in after a rejected reload")
	}

	writeCRL()
	if err := d.reload(cfg); err != nil {
		t.Fatal(err)
	}
	if err := info(); err != nil {
		t.Fatalf("the client, no longer revoked, after the reload: %v", err)
	}
}

// crlOf is a CRL template, current for a day, revoking revoked.
func crlOf(revoked []*x509.Certificate) *x509.RevocationList {
	now := time.Now()
	l := &x509.RevocationList{ThisUpdate: now.Add(-time.Hour), NextUpdate: now.Add(24 * time.Hour)}
	for _, c := range revoked {
		l.RevokedCertificateEntries = append(l.RevokedCertificateEntries, x509.RevocationListEntry{SerialNumber: c.SerialNumber, RevocationTime: now})
	}
	return l
}
