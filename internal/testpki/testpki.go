// Package testpki makes a throwaway certificate authority with server and
// client certificates for TLS tests, written in the file layout GnuTLS
// clients (libnbd, qemu) read: ca-cert.pem, server-cert.pem, server-key.pem,
// client-cert.pem, client-key.pem.
package testpki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// PKI is a CA and the certificates it signed, on disk in Dir.
type PKI struct {
	Dir        string
	CA         *x509.Certificate
	CAPool     *x509.CertPool
	Server     tls.Certificate
	Client     tls.Certificate
	ClientName string
	caKey      *ecdsa.PrivateKey
}

// New makes a CA, a server certificate for 127.0.0.1, ::1 and localhost,
// and a client certificate named clientName, and writes them to dir.
func New(dir, clientName string) (*PKI, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "lvnbd test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	ca, _ := x509.ParseCertificate(caDER)
	p := &PKI{Dir: dir, CA: ca, CAPool: x509.NewCertPool(), ClientName: clientName, caKey: caKey}
	p.CAPool.AddCert(ca)
	if err := writePEM(filepath.Join(dir, "ca-cert.pem"), "CERTIFICATE", caDER); err != nil {
		return nil, err
	}
	issue := func(serial int64, name string, usage x509.ExtKeyUsage, server bool, prefix string) (tls.Certificate, error) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return tls.Certificate{}, err
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial),
			Subject:      pkix.Name{CommonName: name},
			NotBefore:    now.Add(-time.Hour),
			NotAfter:     now.Add(24 * time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		}
		if server {
			tmpl.DNSNames = []string{"localhost"}
			tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
		} else {
			tmpl.DNSNames = []string{name}
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return tls.Certificate{}, err
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return tls.Certificate{}, err
		}
		if err := writePEM(filepath.Join(dir, prefix+"-cert.pem"), "CERTIFICATE", der); err != nil {
			return tls.Certificate{}, err
		}
		if err := writePEM(filepath.Join(dir, prefix+"-key.pem"), "PRIVATE KEY", keyDER); err != nil {
			return tls.Certificate{}, err
		}
		return tls.X509KeyPair(pemBytes("CERTIFICATE", der), pemBytes("PRIVATE KEY", keyDER))
	}
	if p.Server, err = issue(2, "localhost", x509.ExtKeyUsageServerAuth, true, "server"); err != nil {
		return nil, err
	}
	if p.Client, err = issue(3, clientName, x509.ExtKeyUsageClientAuth, false, "client"); err != nil {
		return nil, err
	}
	return p, nil
}

// ServerConfig is a server TLS config that verifies client certificates
// when they are given.
func (p *PKI) ServerConfig() *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{p.Server}, ClientCAs: p.CAPool,
		ClientAuth: tls.VerifyClientCertIfGiven, MinVersion: tls.VersionTLS12}
}

// ClientConfig is a client TLS config, with the client certificate when
// withCert is set.
func (p *PKI) ClientConfig(withCert bool) *tls.Config {
	c := &tls.Config{RootCAs: p.CAPool, ServerName: "localhost"}
	if withCert {
		c.Certificates = []tls.Certificate{p.Client}
	}
	return c
}

// WriteCRL writes ca-crl.pem to Dir: the CA's list of revoked
// certificates, as GnuTLS's clients read it.
func (p *PKI) WriteCRL(revoked ...*x509.Certificate) error {
	var entries []x509.RevocationListEntry
	for _, c := range revoked {
		entries = append(entries, x509.RevocationListEntry{SerialNumber: c.SerialNumber, RevocationTime: time.Now().Add(-time.Minute)})
	}
	b, err := p.SignCRL(&x509.RevocationList{
		ThisUpdate: time.Now().Add(-time.Hour), NextUpdate: time.Now().Add(24 * time.Hour),
		RevokedCertificateEntries: entries,
	})
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(p.Dir, "ca-crl.pem"), b, 0o600)
}

// SignCRL makes the CA's CRL from tmpl (its Number defaults to 1) and
// returns it as PEM.
func (p *PKI) SignCRL(tmpl *x509.RevocationList) ([]byte, error) {
	if tmpl.Number == nil {
		tmpl.Number = big.NewInt(1)
	}
	der, err := x509.CreateRevocationList(rand.Reader, tmpl, p.CA, p.caKey)
	if err != nil {
		return nil, err
	}
	return pemBytes("X509 CRL", der), nil
}

func pemBytes(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func writePEM(path, typ string, der []byte) error {
	return os.WriteFile(path, pemBytes(typ, der), 0o600)
}
