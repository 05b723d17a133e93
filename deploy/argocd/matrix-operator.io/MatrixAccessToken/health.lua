-- Argo CD health check for matrix-operator.io/v1alpha1 MatrixAccessToken
-- (resource.customizations.health.matrix-operator.io_MatrixAccessToken).
--
-- Reads the status the operator writes, by kstatus conventions:
-- status.observedGeneration and the conditions Ready, Reconciling, Stalled.
--   no status yet, or an older generation  -> Progressing
--   being deleted, not revoked yet         -> Progressing ("deletion waits: ...")
--   Stalled=True (waits for a change)      -> Degraded
--   Reconciling=True (working, retrying)   -> Progressing
--   Ready=True                             -> Healthy
-- A status with Ready alone (another writer than this operator): a reason
-- that waits for a change (of the spec, the MatrixUser, the Secret) is
-- Degraded, any other Ready=False Progressing. Plain Lua 5.1 (Argo CD runs gopher-lua).
local WAITING = {
  InvalidSpec = true, Conflict = true, UserNotFound = true,
  UserDeactivated = true, UserLocked = true, TokenRefused = true,
  RotationUnsupported = true, HomeserverNotFound = true, SecretNotFound = true,
  Unauthorized = true, NotAdmin = true,
}

local function condition(status, kind)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function describe(c)
  local reason = c.reason or ""
  local message = c.message or ""
  if reason == "" then
    return message
  end
  if message == "" then
    return reason
  end
  return reason .. ": " .. message
end

local hs = {}
local status = obj.status
local ready = condition(status, "Ready")
local stalled = condition(status, "Stalled")
local reconciling = condition(status, "Reconciling")

if ready == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the operator"
  return hs
end

if obj.metadata.deletionTimestamp ~= nil then
  hs.status = "Progressing"
  if ready.status == "True" then
    hs.message = "being deleted"
  else
    -- The operator says "deletion waits: ..." itself; say it once.
    local waits = ready.message or ""
    if string.sub(waits, 1, 16) == "deletion waits: " then
      waits = string.sub(waits, 17)
    end
    hs.message = "deletion waits: " .. describe({reason = ready.reason, message = waits})
  end
  return hs
end

local generation = obj.metadata.generation
local observed = status.observedGeneration or ready.observedGeneration
if generation ~= nil and observed ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = string.format("waiting for the operator: generation %d not observed yet (the status describes %d)",
    generation, observed)
  return hs
end

if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled)
elseif reconciling ~= nil and reconciling.status == "True" then
  hs.status = "Progressing"
  if ready.status == "False" then
    hs.message = describe(ready)
  else
    hs.message = describe(reconciling)
  end
elseif ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready)
elseif stalled == nil and reconciling == nil and WAITING[ready.reason] then
  hs.status = "Degraded"
  hs.message = describe(ready)
else
  hs.status = "Progressing"
  hs.message = describe(ready)
end
return hs
