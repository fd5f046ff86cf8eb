// Loopback OpenID provider for simral's OIDC login tests (npm oidc-provider), shaped like Pro Santé Connect.
//
// One confidential client, PKCE required, acr values "eidas1" and "low", scope "scope_all" carrying
// PSC's SubjectNameID / SubjectRefPro claims for one test account. Login and consent are completed
// without a browser: GET /interaction/:uid logs the test account in with the configured acr and grants
// every requested scope and claim, so a plain HTTP client that follows redirects reaches redirect_uri.
//
// Configuration (environment):
//   OIDC_PORT            port on 127.0.0.1 (required)
//   OIDC_CLIENT_ID       client_id (default "simral-test")
//   OIDC_CLIENT_SECRET   client_secret (required)
//   OIDC_REDIRECT_URI    the client's only redirect_uri (required)
//   OIDC_ACR             acr of the logins this provider issues (default "eidas1")
//   OIDC_TOKEN_AUTH      token_endpoint_auth_method of the client (default "client_secret_basic")
//   OIDC_USERINFO_JWT    "1": userinfo answered as a signed JWT (application/jwt) instead of JSON
// Test use only: nothing here is fit for production.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { createServer } from 'node:http';

import Provider from 'oidc-provider';

const HOST = '127.0.0.1';

function required(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`missing environment variable ${name}`);
    process.exit(2);
  }
  return value;
}

const port = Number(required('OIDC_PORT'));
const issuer = `http://${HOST}:${port}`;
const clientId = process.env.OIDC_CLIENT_ID || 'simral-test';
const clientSecret = required('OIDC_CLIENT_SECRET');
const redirectUri = required('OIDC_REDIRECT_URI');
const acr = process.env.OIDC_ACR || 'eidas1';
const tokenAuth = process.env.OIDC_TOKEN_AUTH || 'client_secret_basic';
const userinfoJwt = process.env.OIDC_USERINFO_JWT === '1';

const ACCOUNT_ID = 'f:test-psc-account-0001';

// Claims of the test account, with PSC's claim names (UserInfo of scope "scope_all").
const ACCOUNT_CLAIMS = {
  sub: ACCOUNT_ID,
  given_name: 'Camille',
  family_name: 'TESTRADIO',
  preferred_username: '899700000001',
  // "8" + RPPS (11 digits): PSC's national id of an RPPS-registered professional. Test RPPS range.
  SubjectNameID: '899700000001',
  SubjectRole: ['10^1.2.250.1.213.1.1.5.5'],
  SubjectOrganization: 'CENTRE HOSPITALIER DE TEST',
  SubjectOrganizationID: 'R99001',
  SubjectRefPro: {
    codeCivilite: 'MME',
    exercices: [
      {
        codeProfession: '10',
        codeCategorieProfessionnelle: 'C',
        codeCiviliteDexercice: 'DR',
        nomDexercice: 'TESTRADIO',
        prenomDexercice: 'Camille',
        codeTypeSavoirFaire: 'S',
        codeSavoirFaire: 'SM44',
        activities: [
          {
            codeModeExercice: 'S',
            codeSecteurDactivite: 'SA01',
            codeSectionPharmacien: '',
            codeRole: 'FON-01',
            codeGenreActivite: 'GENR01',
            numeroSiretSite: '',
            numeroSirenSite: '',
            numeroFinessSite: '990000001',
            numeroFinessetablissementJuridique: '990000000',
            identifiantTechniqueDeLaStructure: 'F990000001',
            raisonSocialeSite: 'CENTRE HOSPITALIER DE TEST',
            enseigneCommercialeSite: '',
            codePostal: '75000',
            codeCommune: '75056',
            codePays: '99000',
          },
        ],
      },
    ],
  },
};

const PSC_CLAIMS = [
  'given_name', 'family_name', 'preferred_username', 'SubjectNameID', 'SubjectRole',
  'SubjectOrganization', 'SubjectOrganizationID', 'SubjectRefPro',
];

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: `test-${randomBytes(6).toString('hex')}`, use: 'sig', alg: 'RS256' };

const client = {
  client_id: clientId,
  client_secret: clientSecret,
  redirect_uris: [redirectUri],
  grant_types: ['authorization_code'],
  response_types: ['code'],
  token_endpoint_auth_method: tokenAuth,
  id_token_signed_response_alg: 'RS256',
};
if (userinfoJwt) {
  client.userinfo_signed_response_alg = 'RS256';
}

const provider = new Provider(issuer, {
  clients: [client],
  jwks: { keys: [signingKey] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  acrValues: ['eidas1', 'low'],
  scopes: ['openid', 'scope_all'],
  claims: {
    acr: null,
    auth_time: null,
    iss: null,
    sid: null,
    openid: ['sub'],
    scope_all: PSC_CLAIMS,
  },
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: false },
    jwtUserinfo: { enabled: true },
    userinfo: { enabled: true },
  },
  interactions: {
    url: (_ctx, interaction) => `/interaction/${interaction.uid}`,
  },
  async findAccount(_ctx, id) {
    if (id !== ACCOUNT_ID) {
      return undefined;
    }
    return {
      accountId: id,
      async claims() {
        return structuredClone(ACCOUNT_CLAIMS);
      },
    };
  },
  renderError(ctx, out) {
    ctx.type = 'json';
    ctx.body = out;
  },
});

// Auto-complete login (with the configured acr) and consent: no browser, no form.
async function interaction(req, res) {
  const details = await provider.interactionDetails(req, res);
  const { prompt, params, session } = details;
  if (prompt.name === 'login') {
    await provider.interactionFinished(
      req, res, { login: { accountId: ACCOUNT_ID, acr, amr: ['test'] } }, { mergeWithLastSubmission: false },
    );
    return;
  }
  if (prompt.name === 'consent') {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    const missing = prompt.details;
    if (missing.missingOIDCScope) {
      grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    }
    if (missing.missingOIDCClaims) {
      grant.addOIDCClaims(missing.missingOIDCClaims);
    }
    if (missing.missingResourceScopes) {
      for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes)) {
        grant.addResourceScope(indicator, scopes.join(' '));
      }
    }
    const grantId = await grant.save();
    await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
    return;
  }
  res.statusCode = 400;
  res.setHeader('Content-Type', 'application/json');
  res.end(JSON.stringify({ error: 'unsupported_prompt', prompt: prompt.name }));
}

const callback = provider.callback();

const server = createServer((req, res) => {
  if (req.method === 'GET' && req.url.startsWith('/interaction/')) {
    interaction(req, res).catch((err) => {
      console.error('interaction failed:', err);
      if (!res.headersSent) {
        res.statusCode = 500;
        res.setHeader('Content-Type', 'application/json');
      }
      res.end(JSON.stringify({ error: 'interaction_failed', error_description: String(err) }));
    });
    return;
  }
  callback(req, res);
});

server.listen(port, HOST, () => {
  console.log(`oidc test provider ${issuer} (client ${clientId}, acr ${acr}, userinfo ${userinfoJwt ? 'jwt' : 'json'})`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  });
}
