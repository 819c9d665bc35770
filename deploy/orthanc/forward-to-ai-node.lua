-- Orthanc -> dicom-ai-node: send every stable CT or MR series to the AI node, never its own results.
--
-- Loaded by orthanc.json ("LuaScripts"). Settings come from the configuration, section "AiNode":
--   "Modality":          the DicomModalities entry of the node (default "ai-node")
--   "ForwardModalities": the modalities forwarded (default CT and MR)
-- A series is forwarded once it is stable (no new instance for "StableAge" seconds), as an
-- asynchronous Orthanc job: the Lua thread is never blocked by the network, the job is listed under
-- /jobs (Orthanc Explorer > Jobs) and a failed one can be resubmitted with POST /jobs/{id}/resubmit.
--
-- Never forwarded back to the node (that would loop):
--   SEG (1.2.840.10008.5.1.4.1.1.66.4, .66.7) and SR (1.2.840.10008.5.1.4.1.1.88.*) SOP classes,
--   series whose Modality is SEG or SR, whose Manufacturer is "dicom-ai-node",
--   and instances that the node itself stored into Orthanc (calling AE title = the node's).
-- Works with Orthanc 1.5 and newer (GetOrthancConfiguration, "Asynchronous" store jobs).

local NODE_MANUFACTURER = 'dicom-ai-node'
local NEVER_SOP_CLASSES = {
  ['1.2.840.10008.5.1.4.1.1.66.4'] = 'Segmentation Storage',
  ['1.2.840.10008.5.1.4.1.1.66.7'] = 'Label Map Segmentation Storage',
}
local NEVER_SOP_CLASS_PREFIX = '1.2.840.10008.5.1.4.1.1.88.'  -- every SR storage class
local NEVER_MODALITIES = { SEG = true, SR = true }

local function Settings()
  local modality, forward = 'ai-node', { CT = true, MR = true }
  local ok, config = pcall(GetOrthancConfiguration)
  if ok and type(config) == 'table' and type(config['AiNode']) == 'table' then
    local section = config['AiNode']
    if type(section['Modality']) == 'string' then
      modality = section['Modality']
    end
    if type(section['ForwardModalities']) == 'table' then
      forward = {}
      for _, value in pairs(section['ForwardModalities']) do
        forward[string.upper(value)] = true
      end
    end
  end
  local nodeAet = nil
  if ok and type(config) == 'table' and type(config['DicomModalities']) == 'table' then
    local entry = config['DicomModalities'][modality]
    if type(entry) == 'table' then
      nodeAet = entry['AET'] or entry[1]  -- object or [AET, host, port] form
    end
  end
  return modality, forward, nodeAet
end

local AI_MODALITY, FORWARD, NODE_AET = Settings()

local function Trim(value)
  return (string.gsub(value or '', '^%s*(.-)%s*$', '%1'))
end

local function Log(seriesId, tags, message)
  print('ai-node forward: series ' .. seriesId .. ' (' .. Trim(tags['Modality']) .. ' '
        .. Trim(tags['SeriesInstanceUID']) .. '): ' .. message)
end

-- A metadata item of an instance ('' when absent: RestApiGet of a missing one would log an error).
local function Metadata(instance, name)
  local names = ParseJson(RestApiGet('/instances/' .. instance .. '/metadata') or '[]')
  for _, present in pairs(names) do
    if present == name then
      return Trim(RestApiGet('/instances/' .. instance .. '/metadata/' .. name))
    end
  end
  return ''
end

-- Why the series must not go to the node, or nil if it may.
local function ReasonToSkip(seriesId, tags)
  local modality = string.upper(Trim(tags['Modality']))
  if NEVER_MODALITIES[modality] then
    return 'modality ' .. modality .. ' is an AI result, never forwarded'
  end
  if string.lower(Trim(tags['Manufacturer'])) == NODE_MANUFACTURER then
    return 'made by ' .. NODE_MANUFACTURER
  end
  if not FORWARD[modality] then
    return 'modality ' .. (modality ~= '' and modality or '(none)') .. ' is not forwarded'
  end
  local series = ParseJson(RestApiGet('/series/' .. seriesId) or '{}')
  local instance = (series['Instances'] or {})[1]
  if instance == nil then
    return 'no instance left in the series'
  end
  -- One instance tells the SOP class and the sender of the whole series.
  local sopClass = Metadata(instance, 'SopClassUid')
  if NEVER_SOP_CLASSES[sopClass] then
    return 'SOP class ' .. sopClass .. ' (' .. NEVER_SOP_CLASSES[sopClass] .. ') is never forwarded'
  end
  if string.sub(sopClass, 1, string.len(NEVER_SOP_CLASS_PREFIX)) == NEVER_SOP_CLASS_PREFIX then
    return 'SOP class ' .. sopClass .. ' (Structured Report) is never forwarded'
  end
  local origin = Metadata(instance, 'RemoteAET')
  if NODE_AET ~= nil and origin ~= '' and origin == Trim(NODE_AET) then
    return 'stored into Orthanc by the AI node itself (calling AE title ' .. origin .. ')'
  end
  return nil
end

function OnStableSeries(seriesId, tags, metadata)
  local ok, reason = pcall(ReasonToSkip, seriesId, tags)
  if not ok then
    Log(seriesId, tags, 'not forwarded, could not inspect it: ' .. tostring(reason))
    return
  end
  if reason ~= nil then
    Log(seriesId, tags, 'not forwarded: ' .. reason)
    return
  end
  local request = DumpJson({ Resources = { seriesId }, Asynchronous = true }, true)
  local sent, answer = pcall(RestApiPost, '/modalities/' .. AI_MODALITY .. '/store', request)
  if not sent or answer == nil then
    Log(seriesId, tags, 'forward to modality "' .. AI_MODALITY .. '" FAILED to start: ' .. tostring(answer))
    return
  end
  local job = ParseJson(answer)
  Log(seriesId, tags, 'forwarding to modality "' .. AI_MODALITY .. '" as job ' .. tostring(job['ID']))
end

print('ai-node forward: stable ' .. table.concat((function()
  local names = {}
  for name in pairs(FORWARD) do table.insert(names, name) end
  table.sort(names)
  return names
end)(), ', ') .. ' series go to modality "' .. AI_MODALITY .. '"'
  .. (NODE_AET and (' (AE title ' .. NODE_AET .. ')') or ' (NOT CONFIGURED in DicomModalities)'))
