"""IHE XDS.b adapter (ITI TF-2b §3.41 Provide and Register Document Set-b) for the French DMP:
ebRS metadata, the VIHF SAML assertion, the XAdES signature document, SOAP 1.2 + MTOM transport."""
