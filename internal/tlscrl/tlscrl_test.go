package tlscrl

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lvnbd/lvnbd/internal/testpki"
)

func newPKI(t testing.TB) *testpki.PKI {
	t.Helper()
	pki, err := testpki.New(t.TempDir(), "dom0-a")
	if err != nil {
		t.Fatal(err)
	}
	return pki
}

// crlData is pki's CRL revoking revoked, as PEM.
func crlData(t testing.TB, pki *testpki.PKI, revoked ...*x509.Certificate) []byte {
	t.Helper()
	var entries []x509.RevocationListEntry
	for _, c := range revoked {
		entries = append(entries, x509.RevocationListEntry{SerialNumber: c.SerialNumber, RevocationTime: time.Now()})
	}
	return signCRL(t, pki, &x509.RevocationList{ThisUpdate: time.Now().Add(-time.Hour),
		NextUpdate: time.Now().Add(24 * time.Hour), RevokedCertificateEntries: entries})
}

func signCRL(t testing.TB, pki *testpki.PKI, tmpl *x509.RevocationList) []byte {
	t.Helper()
	b, err := pki.SignCRL(tmpl)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestCheck(t *testing.T) {
	pki, other := newPKI(t), newPKI(t)
	client := pki.Client.Leaf
	chain := tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{client, pki.CA}}}
	unheld := signCRL(t, pki, &x509.RevocationList{ThisUpdate: time.Now(), NextUpdate: time.Now().Add(time.Hour),
		RevokedCertificateEntries: []x509.RevocationListEntry{{SerialNumber: client.SerialNumber, RevocationTime: time.Now(), ReasonCode: 8}}})
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
		{"revoked in the second chain", crlData(t, pki, client),
			tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{pki.Server.Leaf, pki.CA}, {client, pki.CA}}}, true},
		{"taken off hold (removeFromCRL)", unheld, chain, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, err := Parse("ca-crl.pem", tt.crl, "client", nil, time.Now())
			if err != nil {
				t.Fatal(err)
			}
			err = l.Check(tt.state)
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
	path := filepath.Join(t.TempDir(), "crl.pem")
	if err := os.WriteFile(path, crlData(t, pki, pki.Client.Leaf), 0o600); err != nil {
		t.Fatal(err)
	}
	l, err := Load(path, "client", []*x509.Certificate{pki.CA})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, crlData(t, pki), 0o600); err != nil { // revokes nothing now
		t.Fatal(err)
	}
	state := tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{pki.Client.Leaf, pki.CA}}}
	var re *RevokedError
	if err := l.Check(state); !errors.As(err, &re) {
		t.Errorf("check: %v, want the client revoked", err)
	}
}

// A CRL that could never revoke anything, or only part of what it should,
// is refused at load, not loaded to do nothing.
func TestLoadRefuses(t *testing.T) {
	pki, sameName := newPKI(t), newPKI(t)
	good := crlData(t, pki)
	cert, err := os.ReadFile(filepath.Join(pki.Dir, "ca-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	delta := signCRL(t, pki, &x509.RevocationList{ThisUpdate: time.Now(), NextUpdate: time.Now().Add(time.Hour),
		ExtraExtensions: []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 27}, Critical: true, Value: []byte{2, 1, 1}}}})
	tests := []struct {
		name string
		data []byte // nil: no file
		want string // in the error
	}{
		{"missing", nil, "no such file"},
		{"empty", []byte{}, `holds no PEM "X509 CRL"`},
		{"a certificate, no CRL", cert, `holds no PEM "X509 CRL"`},
		{"a damaged CRL", []byte("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"), "reading the CRL"},
		{"a good CRL and a damaged one", append(append([]byte{}, good...), "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"...),
			"reading the CRL"},
		// Another CA of the given CA's name, or the CA re-keyed: its CRL
		// would never match.
		{"signed by another key under the CA's name", crlData(t, sameName), "did not sign it"},
		{"a delta CRL", delta, "critical extension 2.5.29.27"},
	}
	dir := t.TempDir()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(dir, "crl.pem")
			os.Remove(path)
			if tt.data != nil {
				if err := os.WriteFile(path, tt.data, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			l, err := Load(path, "client", []*x509.Certificate{pki.CA})
			if err == nil || l != nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Load: %v, want an error saying %q and no list", err, tt.want)
			}
		})
	}
	// A certificate beside the CRL is skipped.
	if _, err := Parse("both.pem", append(append([]byte{}, cert...), good...), "client", []*x509.Certificate{pki.CA}, time.Now()); err != nil {
		t.Errorf("a CRL after a certificate: %v", err)
	}
}

func TestWarnings(t *testing.T) {
	pki := newPKI(t)
	crl := crlData(t, pki, pki.Client.Leaf)
	tests := []struct {
		name string
		cas  []*x509.Certificate
		now  time.Time
		want []string // each in one warning, in order
	}{
		{"current, from the CA", []*x509.Certificate{pki.CA}, time.Now(), nil},
		{"the system's roots", nil, time.Now(), nil},
		{"stale", []*x509.Certificate{pki.CA}, time.Now().Add(48 * time.Hour), []string{"was due to be replaced on"}},
		{"from none of the CAs (an intermediate's?)", []*x509.Certificate{pki.Server.Leaf}, time.Now(),
			[]string{`is issued by "CN=lvnbd test CA", which is none of the CAs given`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, err := Parse("crl.pem", crl, "client", tt.cas, tt.now)
			if err != nil {
				t.Fatal(err)
			}
			if len(l.Warnings) != len(tt.want) {
				t.Fatalf("warnings %q, want %d", l.Warnings, len(tt.want))
			}
			for i, w := range tt.want {
				if !strings.Contains(l.Warnings[i], w) {
					t.Errorf("warning %q, want it to say %q", l.Warnings[i], w)
				}
			}
			// A warning loads the list all the same.
			state := tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{pki.Client.Leaf, pki.CA}}}
			if err := l.Check(state); err == nil {
				t.Error("the revoked client let through")
			}
		})
	}
}

func FuzzParse(f *testing.F) {
	pki := newPKI(f)
	f.Add(crlData(f, pki, pki.Client.Leaf))
	f.Add([]byte("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"))
	state := tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{pki.Client.Leaf, pki.CA}}}
	now := time.Now()
	f.Fuzz(func(t *testing.T, data []byte) {
		l, err := Parse("fuzz.pem", data, "client", []*x509.Certificate{pki.CA}, now)
		if (err == nil) != (l != nil) {
			t.Fatalf("Parse: list %v with error %v", l != nil, err)
		}
		if l != nil {
			_ = l.Check(state) // must not panic
		}
	})
}

// A CA's name may be encoded one way in its certificate (so in the
// certificates it issues) and another in its CRL (PrintableString by one
// tool, UTF8String by another): the same name all the same.
func TestCheckMatchesANameEncodedOtherwise(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	// The CA's name, CN=Storage CA, as a PrintableString and as a
	// UTF8String.
	name := func(tag int) []byte {
		b, err := asn1.Marshal([]pkix.RelativeDistinguishedNameSET{{{Type: asn1.ObjectIdentifier{2, 5, 4, 3}, Value: "Storage CA"}}})
		if err != nil {
			t.Fatal(err)
		}
		// The value is the last element: its tag is the byte before its
		// length (0x0a, 10 bytes).
		i := len(b) - len("Storage CA") - 2
		if b[i+1] != byte(len("Storage CA")) {
			t.Fatalf("unexpected encoding %x", b)
		}
		b[i] = byte(tag)
		return b
	}
	printable, utf8 := name(asn1.TagPrintableString), name(asn1.TagUTF8String)
	now := time.Now()
	makeCA := func(raw []byte) *x509.Certificate {
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), RawSubject: raw, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
			IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		if err != nil {
			t.Fatal(err)
		}
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	caPrintable, caUTF8 := makeCA(printable), makeCA(utf8)
	if bytes.Equal(caPrintable.RawSubject, caUTF8.RawSubject) || caPrintable.Subject.String() != caUTF8.Subject.String() {
		t.Fatal("the two encodings are not of one name")
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(7),
		Subject: pkix.Name{CommonName: "dom0-a"}, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour)},
		caPrintable, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(leafDER)
	if err != nil {
		t.Fatal(err)
	}
	crlDER, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{Number: big.NewInt(1), ThisUpdate: now,
		NextUpdate: now.Add(time.Hour), RevokedCertificateEntries: []x509.RevocationListEntry{{SerialNumber: leaf.SerialNumber, RevocationTime: now}}},
		caUTF8, key)
	if err != nil {
		t.Fatal(err)
	}
	l, err := Parse("crl.pem", pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: crlDER}), "client", []*x509.Certificate{caPrintable}, now)
	if err != nil {
		t.Fatal(err)
	}
	if len(l.Warnings) != 0 {
		t.Errorf("warnings %q", l.Warnings)
	}
	var re *RevokedError
	if err := l.Check(tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{leaf, caPrintable}}}); !errors.As(err, &re) {
		t.Errorf("check: %v, want the certificate revoked", err)
	}
}
