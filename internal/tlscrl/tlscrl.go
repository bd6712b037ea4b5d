// Package tlscrl refuses a TLS peer whose verified certificate chain holds
// a certificate that a certificate revocation list (CRL) revokes: a dom0's
// client certificate taken back without re-keying the CA, or a storage
// box's server certificate. crypto/tls checks no CRL itself.
package tlscrl

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"time"
)

// RevokedError is a peer certificate that a CRL revokes.
type RevokedError struct {
	Whose   string // "server" or "client"
	Subject string
	Serial  *big.Int
	CRL     string // the CRL file
}

func (e *RevokedError) Error() string {
	return fmt.Sprintf("the %s's certificate %q (serial %s) is revoked by the CRL %s", e.Whose, e.Subject, e.Serial, e.CRL)
}

// reasonRemoveFromCRL is the reason code of an entry that takes a
// certificate back off hold (RFC 5280 5.3.1): not a revocation.
const reasonRemoveFromCRL = 8

// List is the CRLs of one file.
type List struct {
	path, whose string
	crls        []*crl
	// Warnings say what the caller should log: a CRL past its next update,
	// or one whose issuer is none of the CAs it was given.
	Warnings []string
}

type crl struct {
	*x509.RevocationList
	revoked map[string]bool // serial numbers, in decimal
}

// Load reads the CRLs in the PEM file path for a peer (whose: "server" or
// "client", for the errors), checked against cas, the CAs the peer's chain
// is verified against (nil: the system's roots, which are not checked).
func Load(path, whose string, cas []*x509.Certificate) (*List, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading the CRL: %w", err)
	}
	return Parse(path, data, whose, cas, time.Now())
}

// Parse is Load of data read from path, at now. Every "X509 CRL" block
// counts (one per CA, as a chain's CAs each sign their own); other blocks
// are skipped, and a file without any is an error.
//
// A CRL that could never revoke anything is refused rather than loaded to
// do nothing: one whose issuer is one of cas by name but is not signed by
// it (another key under the same name, or a CA without the cRLSign key
// usage, which may sign no CRL), and a partial one (a delta CRL, or one
// with an issuing distribution point: any critical extension), which would
// pass for complete. One whose issuer is none of cas may be an
// intermediate CA's, which the peer sends: it is loaded, with a warning. A
// CRL past its next update still counts, with a warning: what it revokes
// stays revoked, and refusing every peer for a stale list would take every
// disk away.
func Parse(path string, data []byte, whose string, cas []*x509.Certificate, now time.Time) (*List, error) {
	l := &List{path: path, whose: whose}
	for {
		var block *pem.Block
		if block, data = pem.Decode(data); block == nil {
			break
		}
		if block.Type != "X509 CRL" {
			continue
		}
		rl, err := x509.ParseRevocationList(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("reading the CRL %s: %w", path, err)
		}
		for _, ext := range rl.Extensions {
			if ext.Critical {
				return nil, fmt.Errorf("the CRL %s of %q has a critical extension %v (a delta or partial CRL?): only complete CRLs "+
					"are supported; generate a full one", path, rl.Issuer, ext.Id)
			}
		}
		if len(cas) > 0 {
			var named, signed bool
			var why error
			for _, ca := range cas {
				if !sameName(ca.RawSubject, rl.RawIssuer, ca.Subject.String(), rl.Issuer.String()) {
					continue
				}
				named = true
				if why = rl.CheckSignatureFrom(ca); why == nil {
					signed = true
					break
				}
			}
			switch {
			case named && !signed:
				return nil, fmt.Errorf("the CRL %s names the CA %q as its issuer but that CA did not sign it (%v): it would "+
					"revoke nothing; generate it with the CA's key, and give the CA the cRLSign key usage "+
					"(certtool: crl_signing_key; openssl: keyUsage = cRLSign)", path, rl.Issuer, why)
			case !named:
				l.Warnings = append(l.Warnings, fmt.Sprintf("the CRL %s is issued by %q, which is none of the CAs given: "+
					"it counts only for certificates of an intermediate CA of that name the %s sends", path, rl.Issuer, whose))
			}
		}
		if !rl.NextUpdate.IsZero() && now.After(rl.NextUpdate) {
			l.Warnings = append(l.Warnings, fmt.Sprintf("the CRL %s of %q was due to be replaced on %s: it still counts, "+
				"but certificates revoked since are not in it; generate a new one", path, rl.Issuer, rl.NextUpdate.Format(time.DateOnly)))
		}
		c := &crl{RevocationList: rl, revoked: make(map[string]bool, len(rl.RevokedCertificateEntries))}
		for _, r := range rl.RevokedCertificateEntries {
			if r.ReasonCode != reasonRemoveFromCRL {
				c.revoked[r.SerialNumber.String()] = true
			}
		}
		l.crls = append(l.crls, c)
	}
	if len(l.crls) == 0 {
		return nil, fmt.Errorf("the CRL %s holds no PEM \"X509 CRL\"", path)
	}
	return l, nil
}

// sameName reports whether two distinguished names are one: the same
// bytes, or the same once decoded (a CA's name may be encoded as a
// PrintableString in its certificate and as a UTF8String in its CRL).
func sameName(rawA, rawB []byte, a, b string) bool {
	return bytes.Equal(rawA, rawB) || a == b
}

// Check is for tls.Config.VerifyConnection: it refuses a peer whose
// verified chains hold a certificate one of the CRLs revokes. A CRL counts
// for a certificate only if it was issued by that certificate's issuer and
// is signed by it, as the verified chain shows: a CRL from another CA
// cannot revoke certificates it did not sign.
func (l *List) Check(cs tls.ConnectionState) error {
	for _, chain := range cs.VerifiedChains {
		for i, cert := range chain {
			if i+1 >= len(chain) {
				break // a root: no issuer in the chain to prove the CRL
			}
			for _, c := range l.crls {
				if !c.revoked[cert.SerialNumber.String()] ||
					!sameName(cert.RawIssuer, c.RawIssuer, cert.Issuer.String(), c.Issuer.String()) ||
					c.CheckSignatureFrom(chain[i+1]) != nil {
					continue // not revoked here, not its issuer's list, or not signed by it
				}
				return &RevokedError{Whose: l.whose, Subject: cert.Subject.String(), Serial: cert.SerialNumber, CRL: l.path}
			}
		}
	}
	return nil
}

// CertificatesIn returns the certificates of a PEM file's data, for Load's
// cas.
func CertificatesIn(data []byte) []*x509.Certificate {
	var out []*x509.Certificate
	for {
		var block *pem.Block
		if block, data = pem.Decode(data); block == nil {
			return out
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		if c, err := x509.ParseCertificate(block.Bytes); err == nil {
			out = append(out, c)
		}
	}
}
