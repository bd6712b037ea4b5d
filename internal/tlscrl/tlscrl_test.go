package tlscrl

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/lvnbd/lvnbd/internal/testpki"
)

func newPKI(t *testing.T) *testpki.PKI {
	t.Helper()
	pki, err := testpki.New(t.TempDir(), "dom0-a")
	if err != nil {
		t.Fatal(err)
	}
	return pki
}

// crl writes pki's CRL revoking revoked and returns its path.
func crl(t *testing.T, pki *testpki.PKI, revoked ...*x509.Certificate) string {
	t.Helper()
	if err := pki.WriteCRL(revoked...); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(pki.Dir, "ca-crl.pem")
}

// crlData is pki's CRL revoking revoked.
func crlData(t *testing.T, pki *testpki.PKI, revoked ...*x509.Certificate) []byte {
	t.Helper()
	data, err := os.ReadFile(crl(t, pki, revoked...))
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func TestCheck(t *testing.T) {
	pki, other := newPKI(t), newPKI(t)
	client := pki.Client.Leaf
	chain := tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{client, pki.CA}}}
	tests := []struct {
		name    string
		crl     []byte
		state   tls.ConnectionState
		revoked bool
	}{
		{"revoked", crlData(t, pki, pki.Server.Leaf, client), chain, true},
		{"another certificate revoked", crlData(t, pki, pki.Server.Leaf), chain, false},
		{"none revoked", crlData(t, pki), chain, false},
		// The other CA has the same name and serial numbers: only its
		// signature tells its CRL apart, and it cannot revoke pki's.
		{"another CA's CRL", crlData(t, other, other.Client.Leaf), chain, false},
		{"no certificate given", crlData(t, pki, client), tls.ConnectionState{}, false},
		// A chain without the issuer cannot prove the CRL is its issuer's.
		{"chain without its CA", crlData(t, pki, client), tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{client}}}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			check, err := Parse("ca-crl.pem", tt.crl, "client")
			if err != nil {
				t.Fatal(err)
			}
			err = check(tt.state)
			var re *RevokedError
			if got := errors.As(err, &re); got != tt.revoked || (err != nil) != tt.revoked {
				t.Fatalf("check: %v, want revoked %v", err, tt.revoked)
			}
			if tt.revoked && (re.Whose != "client" || re.Serial.Cmp(client.SerialNumber) != 0 || re.CRL != "ca-crl.pem" ||
				re.Subject != "CN=dom0-a") {
				t.Errorf("revoked error %+v, want the client's certificate", re)
			}
		})
	}
}

// The lists are read once, by Load: a CRL changed later counts from the
// next Load (the server's reload) on.
func TestCheckKeepsTheListsItRead(t *testing.T) {
	pki := newPKI(t)
	check, err := Load(crl(t, pki, pki.Client.Leaf), "client")
	if err != nil {
		t.Fatal(err)
	}
	crl(t, pki) // revokes nothing now; a reload reads it again
	state := tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{pki.Client.Leaf, pki.CA}}}
	var re *RevokedError
	if err := check(state); !errors.As(err, &re) {
		t.Errorf("check: %v, want the client revoked", err)
	}
}

func TestLoadRefuses(t *testing.T) {
	dir := t.TempDir()
	pki := newPKI(t)
	good := crlData(t, pki)
	cert, err := os.ReadFile(filepath.Join(pki.Dir, "ca-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		data []byte // nil: no file
	}{
		{"missing", nil},
		{"empty", []byte{}},
		{"a certificate, no CRL", cert},
		{"a damaged CRL", []byte("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")},
		{"a good CRL and a damaged one", append(append([]byte{}, good...), "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"...)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(dir, "crl.pem")
			os.Remove(path)
			if tt.data != nil {
				if err := os.WriteFile(path, tt.data, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			if check, err := Load(path, "client"); err == nil || check != nil {
				t.Errorf("Load: %v, want an error and no check", err)
			}
		})
	}
	// A certificate beside the CRL is skipped.
	if _, err := Parse("both.pem", append(append([]byte{}, cert...), good...), "client"); err != nil {
		t.Errorf("a CRL after a certificate: %v", err)
	}
}

func FuzzParse(f *testing.F) {
	pki, err := testpki.New(f.TempDir(), "dom0-a")
	if err != nil {
		f.Fatal(err)
	}
	if err := pki.WriteCRL(pki.Client.Leaf); err != nil {
		f.Fatal(err)
	}
	good, err := os.ReadFile(filepath.Join(pki.Dir, "ca-crl.pem"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add([]byte("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"))
	state := tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{pki.Client.Leaf, pki.CA}}}
	f.Fuzz(func(t *testing.T, data []byte) {
		check, err := Parse("fuzz.pem", data, "client")
		if (err == nil) != (check != nil) {
			t.Fatalf("Parse: check %v with error %v", check != nil, err)
		}
		if check != nil {
			_ = check(state) // must not panic
		}
	})
}
